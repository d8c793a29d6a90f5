"""The archive's fast path: bulk CDR decoding of a bag's MCAP file and a columnar cache per bag.

Design
- Decoding. The contract messages have a fixed byte layout once a channel's joint names (and frame_id,
  array lengths) are fixed, so every message of one channel is a row of the same length. We walk the MCAP
  records ourselves (chunks uncompressed, zstd or lz4, chunk CRCs checked as rosbags checks them), stack
  each channel's payloads into an (n, length) byte matrix and read the float64 columns at offsets found by
  parsing the first row. The structural bytes (encapsulation, frame_id, names, sequence lengths) must be
  identical in every row, and the first and last rows must decode to what rosbags decodes; otherwise the
  bag goes through the per-message path. So does anything irregular: a truncated or corrupt file, several
  .mcap files, a non-CDR channel, another message type on a contract topic, joint names the step rule
  rejects, NaN/inf, commands of the wrong length, a non-finite reward. The per-message path then produces
  the exact problems report. Such bags are rare (a killed writer's last bag, damaged data).
- The step rule stays one function: the decoded rows are fed, by row number, to core.transitions.StepRule
  (the same object TransitionBuilder drives online) in the order the per-message reader would feed them
  (log-time order, ties in file order, as both rosbags and the mcap reader yield them). The rule decides
  which rows make each transition; the arrays are gathered once at the end, with the same arithmetic as
  RobotSpec.observation / commands_to_action (bit-exact, tested against the per-message path).
- Cache. The rule's output (observations, actions, rewards, episode lengths and task ids, and the
  BagReport) is stored as .npy files in `<archive>/.mql_cache/<bag name>-<key>/` (or `$MQL_ARCHIVE_CACHE`).
  The key hashes the bag's file names, sizes and mtimes, the last 64 KiB of each file (the MCAP summary and
  footer: chunk offsets and CRCs, message counts), metadata.yaml, the robot's joints and limits and the
  reading options. A full content hash would cost about as much as the warm load itself (~1 GB for 1M
  transitions); any rewrite by our writers or rosbag2 changes the size, the mtime or the summary. A cache
  entry is written to a temporary directory and renamed into place (atomic); its meta.json holds the size
  and CRC32 of every array file, checked on every load, so a corrupt or half-written entry is rebuilt,
  never trusted. A warm load reads the arrays memory-mapped: nothing is decoded, and the Episodes are views
  of the mapped files, so memory stays bounded by what the caller copies.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mql_ros.core.episode import Episode
from mql_ros.core.errors import IncompleteStep, InputError
from mql_ros.core.robot import RobotSpec
from mql_ros.core.transitions import StepRule

if TYPE_CHECKING:
    from rosbags.typesys.store import Typestore

    from mql_ros.archive.bags import BagReport

CACHE_VERSION = 2
CACHE_DIR_NAME = ".mql_cache"
_MAGIC = b"\x89MCAP0\r\n"
_ARM, _GRIP, _ARM_CMD, _GRIP_CMD, _REWARD, _EPISODE = range(6)
_KIND = {"/joint_states": _ARM, "/gripper/joint_states": _GRIP, "/arm_controller/commands": _ARM_CMD,
         "/gripper_controller/commands": _GRIP_CMD, "/mql/reward": _REWARD, "/mql/episode": _EPISODE}
_TOPIC = {k: t for t, k in _KIND.items()}


class Irregular(Exception):
    """This bag is not decoded in bulk; the per-message path reads it (and reports what is wrong)."""


# ---------------------------------------------------------------------------------------------- MCAP records
def _string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<I", buf, pos)
    return bytes(buf[pos + 4: pos + 4 + n]).decode(), pos + 4 + n


def _decompress(data, compression: str, size: int) -> bytes:
    if compression == "":
        return data
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().decompress(bytes(data), max_output_size=size)
    if compression == "lz4":
        import lz4.frame
        return lz4.frame.decompress(bytes(data))
    raise Irregular(f"chunk compression {compression!r}")


_MSG = struct.Struct("<HIQ")  # channel id, sequence, log time (then publish time, then data)


def _scan_records(buf, start: int, end: int, out: dict) -> None:
    """Schemas, channels and message records in buf[start:end] (top level or inside one chunk)."""
    messages = out["messages"]
    unpack_len, unpack_msg = struct.Struct("<BQ").unpack_from, _MSG.unpack_from
    pos = start
    while pos < end:
        if pos + 9 > end:
            raise Irregular("a record is cut")
        op, length = unpack_len(buf, pos)
        body, pos = pos + 9, pos + 9 + length
        if pos > end:
            raise Irregular("a record is cut")
        if op == 0x05:
            channel, _, log_time = unpack_msg(buf, body)
            messages.append((channel, log_time, out["buffer"], body + 22, length - 22))
        elif op == 0x06:
            _scan_chunk(buf, body, pos, out)
        elif op == 0x03:
            (sid,) = struct.unpack_from("<H", buf, body)
            name, p = _string(buf, body + 2)
            encoding, _ = _string(buf, p)
            out["schemas"][sid] = (name, encoding)
        elif op == 0x04:
            cid, sid = struct.unpack_from("<HH", buf, body)
            topic, p = _string(buf, body + 4)
            encoding, _ = _string(buf, p)
            out["channels"][cid] = (topic, sid, encoding)
        elif op == 0x02:  # footer: the file is complete
            out["footer"] = True
            return


def _scan_chunk(buf, body: int, end: int, out: dict) -> None:
    _, _, size, crc = struct.unpack_from("<QQQI", buf, body)
    compression, p = _string(buf, body + 28)
    (length,) = struct.unpack_from("<Q", buf, p)
    if p + 8 + length > end:
        raise Irregular("a chunk is cut")
    data = _decompress(buf[p + 8: p + 8 + length], compression, size)
    if len(data) != size or (crc and zlib.crc32(data) != crc):
        raise Irregular("chunk CRC or size mismatch")
    if compression == "":
        _scan_records(buf, p + 8, p + 8 + length, out)
    else:
        outer = out["buffer"]
        out["buffers"].append(data)
        out["buffer"] = len(out["buffers"]) - 1
        _scan_records(data, 0, len(data), out)
        out["buffer"] = outer


def scan_mcap(file: Path) -> dict:
    """Channels, schemas and every message (channel, log time, buffer, offset, length) in file order."""
    data = file.read_bytes()
    if data[:8] != _MAGIC:
        raise Irregular("not an MCAP file")
    out = {"schemas": {}, "channels": {}, "messages": [], "buffers": [data], "buffer": 0, "footer": False}
    _scan_records(memoryview(data), 8, len(data), out)
    if not out["footer"]:
        raise Irregular("no MCAP footer (a truncated file)")
    return out


# ---------------------------------------------------------------------------------------------- CDR layouts
def _align(pos: int, n: int) -> int:
    """CDR aligns relative to the end of the 4-byte encapsulation header."""
    return pos + (-(pos - 4)) % n


def _cdr_string(row: bytes, pos: int) -> tuple[str, int]:
    pos = _align(pos, 4)
    (n,) = struct.unpack_from("<I", row, pos)
    return row[pos + 4: pos + 3 + n].decode(), pos + 4 + n


def _cdr_doubles(row: bytes, pos: int) -> tuple[slice, int]:
    pos = _align(pos, 4)
    (n,) = struct.unpack_from("<I", row, pos)
    pos += 4
    if n:
        pos = _align(pos, 8)
    return slice(pos, pos + 8 * n), pos + 8 * n


def _layout(kind: int, row: bytes) -> tuple[dict, list[slice]]:
    """Field offsets of one message, and the byte ranges that may differ between messages of a channel."""
    if row[:4] != b"\x00\x01\x00\x00":
        raise Irregular("not little-endian plain CDR")
    if kind in (_ARM, _GRIP):
        _, pos = _cdr_string(row, 12)  # stamp, then frame_id
        pos = _align(pos, 4)
        (count,) = struct.unpack_from("<I", row, pos)
        names, pos = [], pos + 4
        for _ in range(count):
            name, pos = _cdr_string(row, pos)
            names.append(name)
        position, pos = _cdr_doubles(row, pos)
        velocity, pos = _cdr_doubles(row, pos)
        effort, pos = _cdr_doubles(row, pos)
        return {"names": names, "position": position, "velocity": velocity}, [slice(4, 12), position,
                                                                              velocity, effort]
    if kind in (_ARM_CMD, _GRIP_CMD):
        pos = _align(4, 4)
        (dims,) = struct.unpack_from("<I", row, pos)
        pos += 4
        for _ in range(dims):
            _, pos = _cdr_string(row, pos)
            pos = _align(pos, 4) + 8
        pos = _align(pos, 4) + 4  # data_offset
        data, pos = _cdr_doubles(row, pos)
        return {"data": data}, [data]
    if kind == _REWARD:
        data = slice(_align(4, 8), _align(4, 8) + 8)
        pos = data.stop
        return {"data": data}, [data]
    raise Irregular(f"no fixed layout for {_TOPIC[kind]}")


def _rows(scan: dict, messages: list[int]) -> np.ndarray:
    """The payloads of `messages` (indices into scan['messages']) as an (n, length) byte matrix."""
    recs = scan["messages"]
    lengths = {recs[i][4] for i in messages}
    if len(lengths) != 1:
        raise Irregular("messages of one channel differ in length")
    length = lengths.pop()
    out = np.empty((len(messages), length), dtype=np.uint8)
    buffer_of = np.fromiter((recs[i][2] for i in messages), dtype=np.int64, count=len(messages))
    offset = np.fromiter((recs[i][3] for i in messages), dtype=np.int64, count=len(messages))
    cols = np.arange(length)
    for b in np.unique(buffer_of):
        flat = np.frombuffer(scan["buffers"][b], dtype=np.uint8)
        sel = np.flatnonzero(buffer_of == b)
        for block in range(0, sel.shape[0], 8192):  # bounded index matrices
            part = sel[block: block + 8192]
            out[part] = flat[offset[part, None] + cols[None, :]]
    return out


def _doubles(rows: np.ndarray, where: slice) -> np.ndarray:
    return np.ascontiguousarray(rows[:, where]).view("<f8").astype(np.float64)


# ---------------------------------------------------------------------------------------------- decoding
class _Decoded:
    """Every contract message of one bag: kind, log time and row number into its kind's arrays."""

    def __init__(self) -> None:
        self.kind = np.zeros(0, dtype=np.int8)
        self.stamp = np.zeros(0, dtype=np.int64)
        self.row = np.zeros(0, dtype=np.int64)
        self.values: dict[int, list] = {k: [] for k in range(6)}  # per kind: arrays per channel


def decode_bag(path: Path, robot: RobotSpec, typestore: Typestore, topics: dict) -> tuple[_Decoded, dict]:
    """Bulk-decode one bag's contract messages; Irregular if it must go through the per-message path."""
    files = sorted(path.glob("*.mcap")) if path.is_dir() else [path]
    if len(files) != 1:
        raise Irregular(f"{len(files)} .mcap files")
    scan = scan_mcap(files[0])
    records = scan["messages"]
    channel_of = np.fromiter((m[0] for m in records), dtype=np.int64, count=len(records))
    stamps = np.fromiter((m[1] for m in records), dtype=np.int64, count=len(records))
    kinds = np.full(len(records), -1, dtype=np.int8)
    rows = np.zeros(len(records), dtype=np.int64)
    dec = _Decoded()
    offsets = dict.fromkeys(range(6), 0)
    for cid, (topic, sid, encoding) in sorted(scan["channels"].items()):
        if topic not in topics:
            continue
        schema = scan["schemas"].get(sid)
        if encoding != "cdr" or schema is None or schema[0] != topics[topic]:
            raise Irregular(f"channel {topic} is not {topics[topic]} in CDR")
        sel = np.flatnonzero(channel_of == cid)
        if sel.shape[0] == 0:
            continue
        kind = _KIND[topic]
        kinds[sel] = kind
        rows[sel] = offsets[kind] + np.arange(sel.shape[0])
        offsets[kind] += sel.shape[0]
        dec.values[kind].append(_decode_channel(kind, scan, sel, robot, typestore, topics[topic]))
    keep = np.flatnonzero(kinds >= 0)
    # Both per-message readers yield log-time order, ties in file order: rosbags merges chunks by log time
    # (sorted stably within a chunk), the mcap reader does the same with its chunk index, or sorts stably.
    keep = keep[np.argsort(stamps[keep], kind="stable")]
    dec.kind, dec.stamp, dec.row = kinds[keep], stamps[keep], rows[keep]
    counts = {_TOPIC[k]: int(n) for k, n in zip(*np.unique(dec.kind, return_counts=True), strict=True)}
    return dec, counts


def _decode_channel(kind: int, scan: dict, sel: np.ndarray, robot: RobotSpec, typestore, msgtype: str):
    recs = scan["messages"]
    if kind == _EPISODE:
        out = []
        for i in sel:
            _, _, b, off, n = recs[i]
            out.append(typestore.deserialize_cdr(bytes(scan["buffers"][b][off: off + n]), msgtype).data)
        return out
    rows = _rows(scan, sel.tolist())
    layout, variable = _layout(kind, rows[0].tobytes())
    fixed = np.ones(rows.shape[1], dtype=bool)
    for part in variable:
        fixed[part] = False
    if not np.array_equal(rows[:, fixed], np.broadcast_to(rows[0, fixed], (rows.shape[0], int(fixed.sum())))):
        raise Irregular(f"{_TOPIC[kind]}: messages differ in their structure")
    for i in {0, rows.shape[0] - 1}:  # our layout must agree with rosbags' decoder
        msg = typestore.deserialize_cdr(rows[i].tobytes(), msgtype)
        for field, where in layout.items():
            if field == "names":
                ok = list(msg.name) == where
            else:
                ok = np.array_equal(np.asarray(getattr(msg, field), dtype=np.float64).reshape(-1),
                                    np.ascontiguousarray(rows[i, where]).view("<f8"))
            if not ok:
                raise Irregular(f"{_TOPIC[kind]}: layout differs from rosbags' decoding")
    if kind in (_ARM, _GRIP):
        joints = robot.arm_joints if kind == _ARM else robot.gripper_joints
        names = layout["names"]
        if (len(set(names)) != len(names) or any(j not in names for j in joints)
                or _count(layout["position"]) != len(names) or _count(layout["velocity"]) != len(names)):
            raise Irregular(f"{_TOPIC[kind]}: joint names or lengths the step rule rejects")
        perm = [names.index(j) for j in joints]
        pos, vel = _doubles(rows, layout["position"])[:, perm], _doubles(rows, layout["velocity"])[:, perm]
        if not (np.isfinite(pos).all() and np.isfinite(vel).all()):
            raise Irregular(f"{_TOPIC[kind]}: NaN or inf")
        return np.concatenate([pos, vel], axis=1)
    values = _doubles(rows, layout["data"])
    expected = {_ARM_CMD: robot.n_arm, _GRIP_CMD: 1, _REWARD: 1}[kind]
    if values.shape[1] != expected or not np.isfinite(values).all():
        raise Irregular(f"{_TOPIC[kind]}: {values.shape[1]} values (want {expected}) or NaN/inf")
    return values


def _count(where: slice) -> int:
    return (where.stop - where.start) // 8


def run_rule(dec: _Decoded, robot: RobotSpec, task_id: str, episode_gap_s: float,
             report: BagReport) -> list[Episode]:
    """Feed the decoded rows to the shared step rule in stream order, exactly as bags._feed does with
    decoded messages, then gather the episodes' arrays."""
    rule = StepRule(task_id, episode_gap_s)
    raw: list[tuple] = []
    pending: dict[int, tuple[int, int]] = {}
    events = [e for part in dec.values[_EPISODE] for e in part]
    rewards = np.concatenate(dec.values[_REWARD])[:, 0] if dec.values[_REWARD] else np.zeros(0)
    for kind, stamp, row in zip(dec.kind.tolist(), dec.stamp.tolist(), dec.row.tolist(), strict=True):
        try:
            if kind == _ARM:
                rule.advance(stamp)
                rule.arm = row
            elif kind == _GRIP:
                rule.advance(stamp)
                rule.grip = row
            elif kind == _REWARD:
                rule.on_reward(stamp, row)
            elif kind == _EPISODE:
                rule.on_episode(stamp, events[row])
                if json.loads(events[row]).get("event") == "end":
                    episode = rule.finish_episode()
                    if episode is not None:
                        raw.append(episode)
            else:
                pending[kind] = (stamp, row)
                if _ARM_CMD in pending and _GRIP_CMD in pending:
                    (t_arm, arm), (t_grip, grip) = pending.pop(_ARM_CMD), pending.pop(_GRIP_CMD)
                    joined = max(t_arm, t_grip)
                    rule.advance(joined)
                    rule.on_command(joined, (arm, grip))
        except IncompleteStep as exc:
            report.dropped.append(f"{_TOPIC[kind]} at {stamp} ns: {exc}")
        except InputError as exc:
            report.problems.append(f"{_TOPIC[kind]} at {stamp} ns: {exc}")
    raw += rule.finished
    last = rule.finish_episode()
    if last is not None:
        raw.append(last)
    return _gather(raw, dec, robot, rewards)


def _gather(raw: list[tuple], dec: _Decoded, robot: RobotSpec, rewards: np.ndarray) -> list[Episode]:
    if not raw:
        return []
    arm = np.concatenate(dec.values[_ARM])
    grip = np.concatenate(dec.values[_GRIP])
    n, g = robot.n_arm, robot.n_gripper
    obs_pairs = np.array([p for _, obs, _, _ in raw for p in obs], dtype=np.int64).reshape(-1, 2)
    obs = np.concatenate([arm[obs_pairs[:, 0], :n], arm[obs_pairs[:, 0], n:],
                          grip[obs_pairs[:, 1], :g], grip[obs_pairs[:, 1], g:]], axis=1).astype(np.float32)
    act_pairs = np.array([p for _, _, act, _ in raw for p in act], dtype=np.int64).reshape(-1, 2)
    cmd = np.concatenate([np.concatenate(dec.values[_ARM_CMD])[act_pairs[:, 0]],
                          np.concatenate(dec.values[_GRIP_CMD])[act_pairs[:, 1]]], axis=1)
    lo, hi = robot.command_lower, robot.command_upper  # RobotSpec.commands_to_action, on all rows at once
    actions = np.clip((cmd - 0.5 * (lo + hi)) / (0.5 * (hi - lo)), -1.0, 1.0).astype(np.float32)
    reward_rows = np.array([r for _, _, _, rew in raw for r in rew], dtype=np.int64)
    rew = rewards[reward_rows].astype(np.float32)
    return _split([task for task, *_ in raw], np.array([len(a) for _, _, a, _ in raw]), obs, actions, rew)


def _split(tasks: list[str], lengths: np.ndarray, obs: np.ndarray, actions: np.ndarray,
           rewards: np.ndarray) -> list[Episode]:
    """Episodes as views of the stacked arrays (episode i has lengths[i] steps and lengths[i]+1 states)."""
    out = []
    o = a = 0
    for task, t in zip(tasks, lengths.tolist(), strict=True):
        out.append(Episode(task, obs[o: o + t + 1], actions[a: a + t], rewards[a: a + t]))
        o, a = o + t + 1, a + t
    return out


# ---------------------------------------------------------------------------------------------- the cache
_ARRAYS = ("observations", "actions", "rewards", "lengths")


def cache_root(bag: Path) -> Path:
    env = os.environ.get("MQL_ARCHIVE_CACHE")
    return Path(env).expanduser() if env else bag.parent / CACHE_DIR_NAME


def cache_key(bag: Path, robot: RobotSpec, task_id: str | None, episode_gap_s: float) -> str:
    """Cheap content key: names, sizes, mtimes and the last 64 KiB (MCAP summary + footer) of every file.

    A bag can be read while its writer is closing it: the writer's temporary files (rosbags writes
    metadata.yaml.tmp, then renames it) are not part of the bag, and a file gone between the listing and
    its reading is left out; the key then changes with the next look, once the writer is done."""
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([CACHE_VERSION, robot.to_dict(), task_id, float(episode_gap_s)],
                        sort_keys=True, default=str).encode())
    files = sorted(p for p in bag.iterdir() if p.is_file() and p.suffix != ".tmp") if bag.is_dir() else [bag]
    for f in files:
        try:
            st = f.stat()
            with open(f, "rb") as fh:
                fh.seek(max(0, st.st_size - 65536))
                tail = fh.read()
        except FileNotFoundError:
            if not bag.is_dir():
                raise
            continue
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        h.update(tail)
    return h.hexdigest()


def _crc(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def write_cache(entry: Path, episodes: list[Episode], report: BagReport, obs_dim: int, act_dim: int) -> None:
    """Write one bag's episodes and report to `entry` atomically (a temporary directory renamed)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.tmp"))
    try:
        arrays = {
            "observations": np.concatenate([e.observations for e in episodes]) if episodes
            else np.zeros((0, obs_dim), np.float32),
            "actions": np.concatenate([e.actions for e in episodes]) if episodes
            else np.zeros((0, act_dim), np.float32),
            "rewards": np.concatenate([e.rewards for e in episodes]) if episodes else np.zeros(0, np.float32),
            "lengths": np.array([len(e) for e in episodes], dtype=np.int64),
        }
        files = {}
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
            files[name] = [(tmp / f"{name}.npy").stat().st_size, _crc(tmp / f"{name}.npy")]
        meta = {"version": CACHE_VERSION, "tasks": [e.task_id for e in episodes], "report": asdict(report),
                "files": files}
        (tmp / "meta.json").write_text(json.dumps(meta))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            tmp.rename(entry)
        except OSError:  # another process wrote the same entry first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_cache(entry: Path) -> tuple[list[Episode], dict] | None:
    """The cached episodes (views of memory-mapped arrays) and report dict, or None if the entry is missing
    or fails any check (then the caller rebuilds it)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION or set(meta["files"]) != set(_ARRAYS):
            return None
        arrays = {}
        for name in _ARRAYS:
            f = entry / f"{name}.npy"
            size, crc = meta["files"][name]
            if f.stat().st_size != size or _crc(f) != crc:
                return None
            arrays[name] = np.load(f, mmap_mode="r", allow_pickle=False)
        lengths = np.asarray(arrays["lengths"])
        tasks = meta["tasks"]
        if (len(tasks) != lengths.shape[0] or arrays["actions"].shape[0] != lengths.sum()
                or arrays["observations"].shape[0] != lengths.sum() + lengths.shape[0]):
            return None
        return _split(tasks, lengths, arrays["observations"], arrays["actions"], arrays["rewards"]), meta["report"]
    except (OSError, ValueError, KeyError, TypeError, InputError):
        return None


def drop_stale(entry: Path) -> None:
    """Remove other cache entries of the same bag (older keys) and a broken entry at `entry`."""
    prefix = entry.name.rsplit("-", 1)[0] + "-"
    for old in entry.parent.glob(prefix + "*"):
        if old.is_dir() and old.name[len(prefix):].isalnum() and len(old.name) == len(entry.name):
            shutil.rmtree(old, ignore_errors=True)
