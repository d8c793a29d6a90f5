"""Error types of the package. Each message names the offending input, so a user can fix it."""


class MQLError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(MQLError, ValueError):
    """A configuration value or key is invalid (unknown key, out of range, wrong type)."""


class CheckpointError(MQLError):
    """A checkpoint is missing, corrupt, of an unknown version or built for another configuration."""


class InputError(MQLError, ValueError):
    """Data given to the core is malformed: wrong shape, NaN/inf, unknown joint names."""


class IncompleteStep(InputError):
    """A command or step end came before the state or reward it needs in this episode (at an episode or
    recording boundary): the step is dropped. Expected at boundaries, unlike malformed data."""


class AdaptationCancelled(MQLError):
    """adapt() was asked to stop between two updates, or the loading of its archive between two bags (a node
    shutting down); the agent is half-adapted."""


class ArchiveError(MQLError):
    """A bag or archive directory cannot be read or written as asked."""
