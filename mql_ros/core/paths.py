"""Where the package's shared files (urdf/, config/, launch/, checkpoints/) are, however it was installed.

colcon and pip both install them under `<prefix>/share/mql_ros`; a source checkout has them at the repo
root. Looking in that order means one URDF and one config serve every kind of user.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

PACKAGE = "mql_ros"
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def share_dir() -> Path:
    """The directory holding urdf/, config/, launch/ and checkpoints/ for this installation."""
    candidates = []
    try:  # a ROS install: ament index (AMENT_PREFIX_PATH)
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory

        try:
            candidates.append(Path(get_package_share_directory(PACKAGE)))
        except (PackageNotFoundError, ValueError, KeyError, LookupError, OSError):
            pass
    except ImportError:
        pass
    candidates += [Path(sys.prefix) / "share" / PACKAGE, _SOURCE_ROOT]
    for c in candidates:
        if (c / "urdf").is_dir() and (c / "config").is_dir():
            return c
    raise FileNotFoundError(f"cannot find the {PACKAGE} share directory (looked in {candidates})")


def unused_path(directory: Path, stem: str, first: int = 0, digits: int = 4, suffix: str = "") -> Path:
    """`directory`/<stem>_<n><suffix> for the first n >= `first` not taken yet, the stem made safe for a file
    name: a writer never overwrites what an earlier run left there (a restarted node counts from 1 again)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)
    n = first
    while (path := Path(directory) / f"{safe}_{n:0{digits}d}{suffix}").exists():
        n += 1
    return path


def share_file(relative: str) -> Path:
    """A file under the share directory, e.g. share_file('urdf/mql_arm.urdf')."""
    path = share_dir() / relative
    if not path.exists():
        raise FileNotFoundError(f"{relative} is not installed (looked in {share_dir()})")
    return path
