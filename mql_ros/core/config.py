"""Every knob of MQL meta-training and adaptation, with strict loading from YAML or a dict.

Defaults follow the authors' code (../shared/MQL.md) except where a 2-core CPU needs smaller numbers:
256x256 MLPs instead of 300x300 (about 30% fewer multiply-adds per update, same depth), and a history of
H = 50 steps instead of 30 so a whole arm episode (50 steps) fits in one window and deployment stays O(1)
per step. A typo in a config file must never silently fall back to a default, so unknown keys, wrong
types and out-of-range values are all ConfigError naming the key.

Separate actor and critic GRUs (the authors' choice) are the default. One shared GRU is ~1.4x more updates
per second (benchmarks/speed.py --shared-encoder) but learned slightly worse in the one comparison made
(point_goal, 6000 steps, 3 seeds, mean test return: separate -10.8, shared -12.5, no context -21.6).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from mql_ros.core.errors import ConfigError

# key -> (kind, lower, upper, lower_inclusive, upper_inclusive); bounds None = unbounded.
_Range = tuple[str, float | None, float | None, bool, bool]


def _num(kind: str, lo: float | None = None, hi: float | None = None, lo_inc: bool = True,
         hi_inc: bool = True) -> _Range:
    return (kind, lo, hi, lo_inc, hi_inc)


_ADAPT_RANGES: dict[str, _Range] = {
    "propensity_C": _num("float", 0.0, None, lo_inc=False),
    "beta_clip": _num("float", 0.0, 20.0, lo_inc=False),
    "min_weight": _num("float", 0.0, None),
    "fixed_lambda": _num("float", 0.0, None),
    "new_task_iters": _num("int", 0, None),
    "archive_iters": _num("int", 0, None),
    "archive_batch_mult": _num("int", 1, None),
    "snapshot_per_task": _num("int", 1, None),
    "lr": _num("float", 0.0, 1.0, lo_inc=False),
    "new_steps": _num("int", 0, None),
}
_ADAPT_CHOICES = {"propensity_features": ("context", "context+obs"), "proximal": ("ess", "fixed", "off")}

_MQL_RANGES: dict[str, _Range] = {
    "history_len": _num("int", 1, None),
    "context_dim": _num("int", 1, None),
    "lr": _num("float", 0.0, 1.0, lo_inc=False),
    "batch_size": _num("int", 1, None),
    "gamma": _num("float", 0.0, 1.0),
    "tau": _num("float", 0.0, 1.0, lo_inc=False),
    "expl_noise": _num("float", 0.0, None),
    "policy_noise": _num("float", 0.0, None),
    "noise_clip": _num("float", 0.0, None),
    "policy_delay": _num("int", 1, None),
    "start_steps": _num("int", 0, None),
    "replay_size": _num("int", 1, None),
    "updates_per_step": _num("int", 1, None),
    "actor_preactivation_l2": _num("float", 0.0, None),
}


def _describe(r: _Range) -> str:
    _, lo, hi, lo_inc, hi_inc = r
    left = "(-inf" if lo is None else ("[" if lo_inc else "(") + f"{lo:g}"
    right = "inf)" if hi is None else f"{hi:g}" + ("]" if hi_inc else ")")
    return f"{left}, {right}"


def _check_number(where: str, key: str, value: Any, r: _Range) -> int | float:
    kind, lo, hi, lo_inc, hi_inc = r
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}{key}: expected {'an integer' if kind == 'int' else 'a number'}, "
                          f"got {type(value).__name__} {value!r}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}{key}: expected an integer, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}{key}: must be finite, got {value!r}")
    ok = ((lo is None or (value >= lo if lo_inc else value > lo))
          and (hi is None or (value <= hi if hi_inc else value < hi)))
    if not ok:
        raise ConfigError(f"{where}{key}={value!r} is out of range {_describe(r)}")
    return value


def _check_bool(where: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}{key}: expected true or false, got {type(value).__name__} {value!r}")
    return value


def _check_choice(where: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}{key}={value!r} is not one of {list(choices)}")
    return value


def _reject_unknown(where: str, d: dict, cls: type) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where.rstrip(': ') or 'config'}: expected a mapping, got {type(d).__name__}")
    valid = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ConfigError(f"{where}unknown config key(s) {unknown}; valid keys: {valid}")


@dataclass(frozen=True)
class AdaptConfig:
    """MQL adaptation (paper steps 1-8). Each knob can be switched off for the ablations."""

    use_propensity: bool = True  # False: archive weights all 1 (or no archive data, see use_archive)
    use_archive: bool = True  # False: adapt on new-task data only
    propensity_C: float = 0.5  # inverse L2 strength of the logistic model
    propensity_features: str = "context"  # "context" | "context+obs"
    beta_clip: float = 1.2  # logit clamped below at -beta_clip -> beta <= e^beta_clip
    min_weight: float = 0.1  # weights below this are set to 0
    # "ess" (lambda = 1 - ESS) | "fixed" (fixed_lambda) | "off". Fixed by default, as in the authors'
    # released configurations: in our ablations ESS-driven lambda did not raise the mean adapted return
    # (point_goal: gap closed 0.18 vs 0.29 fixed; arm_reach, mean over the first eight meta-training runs in the
    # README's table: held-out -4.18 vs -4.05 fixed, out of distribution -11.81 vs -11.76). Over three seeds of the
    # shipped discount-0.95 configuration ESS had the better mean (held-out -3.06 vs -3.08, ood -8.03 vs -8.25) but
    # the better held-out result on one seed of three: within the seed-to-seed spread.
    proximal: str = "fixed"
    fixed_lambda: float = 0.1
    new_task_iters: int = 10  # TD3 iterations on new data alone
    archive_iters: int = 100  # weighted TD3 iterations on new + archive data
    archive_batch_mult: int = 5
    snapshot_per_task: int = 2000  # latest transitions per training task used as propensity negatives
    lr: float = 3e-4
    new_steps: int = 0  # 0 = one episode of new-task data

    def __post_init__(self) -> None:
        for key in ("use_propensity", "use_archive"):
            _check_bool("adapt.", key, getattr(self, key))
        for key, r in _ADAPT_RANGES.items():
            object.__setattr__(self, key, _check_number("adapt.", key, getattr(self, key), r))
        if self.proximal is False:  # YAML 1.1 (PyYAML) reads an unquoted `off` as false
            object.__setattr__(self, "proximal", "off")
        for key, choices in _ADAPT_CHOICES.items():
            _check_choice("adapt.", key, getattr(self, key), choices)

    @classmethod
    def from_dict(cls, d: dict) -> AdaptConfig:
        _reject_unknown("adapt: ", d, cls)
        return cls(**d)

    def with_overrides(self, items: Sequence[str]) -> AdaptConfig:
        """This config with KEY=VALUE overrides (the command line's), checked like a config file's adapt:.
        Values are YAML scalars, except that 1e-3 is a number (YAML 1.1, which PyYAML reads, takes it for a
        string)."""
        overrides = {}
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"adapt override {item!r}: expected KEY=VALUE")
            try:
                parsed = _load_yaml(value)
            except yaml.YAMLError as e:
                raise ConfigError(f"adapt override {item!r}: the value is not valid YAML: {_yaml_problem(e)}") from e
            if isinstance(parsed, str):
                try:
                    parsed = float(value)
                except ValueError:
                    pass
            overrides[key] = parsed
        return AdaptConfig.from_dict({**self.to_dict(), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MQLConfig:
    """TD3-context meta-training: networks, context window and the TD3 hyper-parameters."""

    history_len: int = 50  # H: context window; >= the arm's 50-step episodes keeps deployment O(1)
    context_dim: int = 30  # GRU hidden size (authors: 30)
    hidden_sizes: tuple[int, ...] = (256, 256)
    use_context: bool = True  # False: plain multi-task TD3 without a context (the ablation)
    shared_encoder: bool = False  # True: one GRU (trained by the critic loss) serves actor and critic
    # Scale each context feature by 1/std of the warm-up data before the GRU (networks.ContextEncoder).
    normalize_context_inputs: bool = True
    lr: float = 3e-4
    batch_size: int = 256
    gamma: float = 0.99
    tau: float = 0.005  # polyak factor of the target networks
    expl_noise: float = 0.2  # Gaussian exploration noise, action units
    policy_noise: float = 0.3  # target policy smoothing noise, action units
    noise_clip: float = 0.5
    policy_delay: int = 2  # actor and targets are updated every policy_delay critic steps
    start_steps: int = 10_000  # uniformly random actions before the policy acts
    replay_size: int = 1_000_000
    updates_per_step: int = 1
    # Actor loss + this * sum(pre-tanh action^2), as rlkit's DDPG `policy_pre_activation_weight`: keeps the
    # tanh out of saturation, where its gradient vanishes and an action stuck at a joint limit cannot come
    # back. 0 = the authors' TD3. Absolute joint-position actions need it (config/arm_reach_train.yaml).
    actor_preactivation_l2: float = 0.0
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    def __post_init__(self) -> None:
        sizes = self.hidden_sizes
        if isinstance(sizes, (str, bytes)) or not isinstance(sizes, (list, tuple)) or not sizes:
            raise ConfigError(f"hidden_sizes: expected a non-empty list of positive integers, got {sizes!r}")
        checked = tuple(_check_number("", f"hidden_sizes[{i}]", s, _num("int", 1, None))
                        for i, s in enumerate(sizes))
        object.__setattr__(self, "hidden_sizes", checked)
        _check_bool("", "use_context", self.use_context)
        _check_bool("", "shared_encoder", self.shared_encoder)
        _check_bool("", "normalize_context_inputs", self.normalize_context_inputs)
        for key, r in _MQL_RANGES.items():
            object.__setattr__(self, key, _check_number("", key, getattr(self, key), r))
        if not isinstance(self.adapt, AdaptConfig):
            raise ConfigError(f"adapt: expected an AdaptConfig, got {type(self.adapt).__name__}")

    @classmethod
    def from_dict(cls, d: dict) -> MQLConfig:
        """Build from a plain dict (e.g. parsed YAML); missing keys take the defaults."""
        _reject_unknown("", d, cls)
        d = dict(d)
        if "adapt" in d:
            d["adapt"] = AdaptConfig.from_dict(d["adapt"] if d["adapt"] is not None else {})
        if "hidden_sizes" in d and isinstance(d["hidden_sizes"], list):
            d["hidden_sizes"] = tuple(d["hidden_sizes"])
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden_sizes"] = list(self.hidden_sizes)
        return d


# The keys that fix the networks' shape and the context window they were trained to read: a run that continues
# a trained agent (`mql-ros train --init`) keeps them.
NETWORK_KEYS = ("history_len", "context_dim", "hidden_sizes", "use_context", "shared_encoder")


def check_same_networks(base: MQLConfig, cfg: MQLConfig) -> None:
    """ConfigError naming each NETWORK_KEYS key on which `cfg` differs from `base`."""
    changed = [f"{k} ({getattr(base, k)} -> {getattr(cfg, k)})" for k in NETWORK_KEYS
               if getattr(base, k) != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"continuing a trained agent keeps its networks' shape and context window; the config "
                          f"changes {', '.join(changed)}")


def continued_config(base: MQLConfig, path: str | Path | None) -> MQLConfig:
    """The config of a run that continues training an agent of config `base`: base, then the YAML's keys
    (e.g. a lower lr and noise for a final phase); a key that would reshape the networks is an error."""
    cfg = MQLConfig.from_dict(_merge(base.to_dict(), _read_yaml(path) if path is not None else {}))
    check_same_networks(base, cfg)
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: PyYAML silently keeps the last value, so a
    forgotten second `lr:` further down a file would win unnoticed."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # keys merged in by `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key!r}", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats that PyYAML's YAML 1.1 resolver reads as strings: an exponent without a dot in the mantissa
# (1e-3, 5E+2) or without a sign (1.0e5). `lr: 1e-3`, the usual way to write a learning rate, was refused as
# the string '1e-3'. Added after SafeLoader's own resolvers, so ints, 1.0e-3, .inf and .nan read as before.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _load_yaml(text: str) -> Any:
    """Every config YAML the package reads (files and --adapt-set values) is parsed here."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: builds no Python objects


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: where (line, column) and what, without its multi-line excerpt."""
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
        return " ".join(str(e).split())
    mark, context = e.problem_mark, e.context_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
    if e.context:
        at = f" at line {context.line + 1}, column {context.column + 1}" if context else ""
        text += f" ({e.context}{at})"
    return text


def _read_yaml(path: str | Path) -> dict:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from e
    try:
        data = _load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, "
                          f"got {type(data).__name__}")
    return data


def _merge(base: dict, overrides: dict) -> dict:
    """Overrides win key by key; the nested `adapt` mapping is merged, not replaced."""
    out = dict(base)
    for k, v in overrides.items():
        if k == "adapt" and isinstance(v, dict) and isinstance(out.get("adapt"), dict):
            out["adapt"] = {**out["adapt"], **v}
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> MQLConfig:
    """Defaults, then the YAML file (if given), then `overrides` (e.g. from the command line)."""
    d = _read_yaml(path) if path is not None else {}
    if overrides:
        d = _merge(d, overrides)
    return MQLConfig.from_dict(d)



def adapt_config_over(base: AdaptConfig, path: str | Path) -> AdaptConfig:
    """`base` (a checkpoint's adaptation settings) with the keys of the YAML file's `adapt:` section over it;
    the file's other sections are not read (MQLConfig's own checks still apply to the merged adapt keys)."""
    data = _read_yaml(path)
    section = data.get("adapt") or {}
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: adapt: must be a mapping, got {type(section).__name__}")
    return AdaptConfig.from_dict({**base.to_dict(), **section})
