"""The one file format for weights: config + dims + family + robot spec + weights + version, and its sha256.

Plain tensors and plain Python only, read back with torch.load(weights_only=True), so loading a file never
runs code from it. A checkpoint that does not fit (other dims, robot or config) is refused by name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mql_ros.core.config import MQLConfig
from mql_ros.core.errors import CheckpointError, ConfigError, InputError
from mql_ros.core.robot import BagEncoding, BoxSpec, spec_from_dict
from mql_ros.core.td3 import TD3Context, build_networks

CHECKPOINT_VERSION = 2  # 2: context encoders hold an input_scale; version 1 files read as scale 1
_KEYS = ("version", "config", "obs_dim", "act_dim", "family", "robot", "weights", "extra")


@dataclass
class Checkpoint:
    config: MQLConfig
    obs_dim: int
    act_dim: int
    family: str
    robot: BagEncoding | None  # how its observations and actions sit on the contract topics
    weights: dict
    version: int = CHECKPOINT_VERSION
    sha256: str = ""
    extra: dict = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path: str | Path, agent: TD3Context, family: str, robot: BagEncoding | None = None,
                    extra: dict | None = None) -> str:
    """Write atomically (temp file in the same directory, then os.replace); return the file's sha256."""
    path = Path(path)
    if robot is not None and (robot.obs_dim, robot.act_dim) != (agent.obs_dim, agent.act_dim):
        raise InputError(f"save_checkpoint: robot has obs_dim={robot.obs_dim}, act_dim={robot.act_dim} but "
                         f"the agent has {agent.obs_dim}, {agent.act_dim}")
    payload = {"version": CHECKPOINT_VERSION, "config": agent.cfg.to_dict(), "obs_dim": agent.obs_dim,
               "act_dim": agent.act_dim, "family": str(family),
               "robot": robot.to_dict() if robot is not None else None,
               "weights": agent.state_dict(), "extra": dict(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a checkpoint is read by other users' nodes
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file_sha256(path)


def _tensors(obj, name: str = ""):
    """(name, tensor) of every tensor in a nested state dict, e.g. ("critic_encoder.input_scale", t)."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, (dict, list, tuple)):
        for k, v in obj.items() if isinstance(obj, dict) else enumerate(obj):
            yield from _tensors(v, f"{name}.{k}" if name else str(k))


def load_checkpoint(path: str | Path, expect_obs_dim: int | None = None, expect_act_dim: int | None = None,
                    expect_robot: BagEncoding | None = None) -> Checkpoint:
    """Read and validate a checkpoint; every problem is a CheckpointError naming the file."""
    path = Path(path)

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {problem}")

    if not path.is_file():
        raise fail("no such file")
    # Read once: the sha256 is of the very bytes loaded, even if the file is replaced meanwhile.
    try:
        data = path.read_bytes()
    except OSError as e:
        raise fail(f"cannot read it ({e.strerror})") from e
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated / foreign files
        first_line = (str(e).splitlines() or [""])[0][:200]  # an empty file raises EOFError with no text
        raise fail(f"not a readable checkpoint ({type(e).__name__}: {first_line})") from e
    if not isinstance(payload, dict):
        raise fail(f"not a checkpoint (top level is {type(payload).__name__})")
    missing = [k for k in _KEYS if k not in payload]
    if missing:
        raise fail(f"missing keys {missing}")
    if payload["version"] not in (1, CHECKPOINT_VERSION):
        raise fail(f"unknown version {payload['version']!r} (this code reads versions 1 to {CHECKPOINT_VERSION})")
    try:
        cfg = MQLConfig.from_dict(payload["config"])
    except (ConfigError, TypeError) as e:
        raise fail(f"invalid config: {e}") from e
    obs_dim, act_dim = payload["obs_dim"], payload["act_dim"]
    if not (isinstance(obs_dim, int) and isinstance(act_dim, int) and obs_dim > 0 and act_dim > 0):
        raise fail(f"invalid dims obs_dim={obs_dim!r}, act_dim={act_dim!r}")
    if expect_obs_dim is not None and obs_dim != expect_obs_dim:
        raise fail(f"obs_dim is {obs_dim}, expected {expect_obs_dim}")
    if expect_act_dim is not None and act_dim != expect_act_dim:
        raise fail(f"act_dim is {act_dim}, expected {expect_act_dim}")
    robot = None
    if payload["robot"] is not None:
        try:
            robot = spec_from_dict(payload["robot"])
        except (InputError, KeyError, TypeError, ValueError) as e:
            raise fail(f"invalid robot spec: {e}") from e
        if (robot.obs_dim, robot.act_dim) != (obs_dim, act_dim):
            raise fail(f"robot spec dims ({robot.obs_dim}, {robot.act_dim}) differ from the weights' "
                       f"({obs_dim}, {act_dim})")
    if expect_robot is not None and robot != expect_robot:
        if robot is None:
            raise fail("holds no robot spec, expected one")
        if type(robot) is not type(expect_robot):
            raise fail(f"holds a {type(robot).__name__} ({robot.to_dict()}), expected a {type(expect_robot).__name__}")
        have, want = robot.to_dict(), expect_robot.to_dict()
        diff = "; ".join(f"{k} {have.get(k)} (expected {want[k]})" for k in want if have.get(k) != want[k])
        raise fail(f"built for another robot: {diff}")
    weights = payload["weights"]
    if not isinstance(weights, dict):
        raise fail("weights are not a mapping")
    for part in ("nets", "targets"):
        bad = [n for n, t in _tensors(weights.get(part, {})) if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise fail(f"weights ({part}) contain NaN or inf: {', '.join(bad)}")
    if payload["version"] == 1:
        _add_unit_input_scales(weights)
    mismatch = _shape_mismatch(cfg, obs_dim, act_dim, weights)
    if mismatch:
        raise fail(f"weights do not fit the checkpoint's config: {mismatch}")
    extra = payload["extra"] if isinstance(payload["extra"], dict) else {}
    problem = _extra_problem(extra)
    if problem:
        raise fail(problem)
    ckpt = Checkpoint(cfg, obs_dim, act_dim, str(payload["family"]), robot, weights, CHECKPOINT_VERSION,
                      hashlib.sha256(data).hexdigest(), extra)
    try:  # the weights must fit the networks the config builds
        agent_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise fail(str(e)) from e
    return ckpt


# The `extra` keys this package writes and reads back (cli.py, nodes/adaptation.py), and their types. Others
# are kept as they are. A hand-edited value of the wrong type loaded, then failed later: `train --init` with a
# string as extra.curve failed after the whole training run.
_NUMBER = (int, float)
_EXTRA_TYPES: dict[str, tuple[type, ...]] = {
    "curve": (list,), "steps": (int,), "seed": (int,), "command": (str,), "init": (dict,),
    "adapted_from": (str,), "source": (str,), "report": (dict,),
    "task_id": (str,), "parent_sha256": (str,), "adaptation": (dict,), "validation": (str,),
}
_TYPE_NAMES = {list: "a list", int: "an integer", str: "a string", dict: "a mapping"}


def _extra_problem(extra: dict) -> str:
    """Why a known key of `extra` does not hold what this package wrote there ('' if all do)."""
    for key, types in _EXTRA_TYPES.items():
        if key not in extra:
            continue
        value = extra[key]
        if not isinstance(value, types) or isinstance(value, bool):
            return (f"extra.{key} must be {' or '.join(_TYPE_NAMES[t] for t in types)}, got "
                    f"{type(value).__name__} {str(value)[:100]!r}")
    for i, entry in enumerate(extra.get("curve", [])):  # learning-curve entries (or plain numbers)
        if isinstance(entry, dict):
            bad = [k for k in ("step", "seconds") if k in entry and (not isinstance(entry[k], _NUMBER)
                                                                  or isinstance(entry[k], bool))]
            if bad:
                return f"extra.curve[{i}].{bad[0]} must be a number, got {str(entry[bad[0]])[:100]!r}"
        elif not isinstance(entry, _NUMBER) or isinstance(entry, bool):
            return f"extra.curve[{i}] must be a learning-curve entry (a mapping), got {str(entry)[:100]!r}"
    return ""


def _shape_mismatch(cfg: MQLConfig, obs_dim: int, act_dim: int, weights: dict) -> str:
    """Why the networks' tensors differ from what `cfg` builds ('' if they fit), checked on the meta device:
    a config asking for huge layers allocates nothing, so the networks built next are no bigger than the file."""
    try:
        with torch.device("meta"):
            want = {k: tuple(t.shape) for k, t in build_networks(cfg, obs_dim, act_dim).state_dict().items()}
    except RuntimeError as e:  # sizes past what torch can address
        return f"its config builds no networks ({(str(e).splitlines() or [''])[0][:200]})"
    for part in ("nets", "targets"):
        state = weights.get(part)
        if not isinstance(state, dict):
            return f"{part} is not a mapping"
        have = {k: tuple(t.shape) if isinstance(t, torch.Tensor) else None for k, t in state.items()}
        missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        wrong = [f"{k}: {have[k]} in the checkpoint, {want[k]} by its config" for k in want
                 if k in have and have[k] != want[k]]
        problems = ([f"missing {', '.join(missing[:5])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:5])}"] if unexpected else []) + (
            [f"size mismatch for {'; '.join(wrong[:5])}"] if wrong else [])
        if problems:
            return f"{part}: " + "; ".join(problems)
    return ""


def _add_unit_input_scales(weights: dict) -> None:
    """Version 1 encoders read raw entries: give each the input_scale of ones that means the same."""
    for part in ("nets", "targets"):
        state = weights.get(part)
        if not isinstance(state, dict):
            continue
        for key in [k for k in state if k.endswith(".gru.weight_ih_l0")]:
            state.setdefault(key.replace(".gru.weight_ih_l0", ".input_scale"), torch.ones(state[key].shape[1]))


def agent_from_checkpoint(ckpt: Checkpoint) -> TD3Context:
    """A TD3Context built from the checkpoint's config and dims, holding its weights and optimizer state."""
    agent = TD3Context(ckpt.config, ckpt.obs_dim, ckpt.act_dim)
    try:
        agent.load_state_dict(ckpt.weights)
    except Exception as e:  # untrusted input: e.g. an optimizer state of the wrong kind raises AttributeError
        # torch puts the tensors that do not fit (name and both shapes) on the lines after its first
        reason = " ".join(line.strip() for line in str(e).splitlines() if line.strip())[:1000]
        raise CheckpointError(f"weights do not fit the checkpoint's config: {reason}") from e
    try:
        agent.check_context_input_scales()
    except InputError as e:
        raise CheckpointError(f"invalid weights: {e}") from e
    return agent


def bag_encoding(ckpt: Checkpoint) -> BagEncoding:
    """How bags of this checkpoint's family encode observations and actions: its spec, or for a checkpoint
    saved without one (a generic family before specs were stored) the BoxSpec its dims determine."""
    return ckpt.robot if ckpt.robot is not None else BoxSpec(ckpt.obs_dim, ckpt.act_dim)
