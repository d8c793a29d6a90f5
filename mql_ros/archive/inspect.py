"""`mql-ros archive info|verify|export`: what an archive holds and what is wrong with it, for humans."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from mql_ros.archive import columnar
from mql_ros.archive.bags import TOPICS, TYPESTORE, BagReport, bag_dirs, read_bag, read_bag_per_message
from mql_ros.core.episode import Episode
from mql_ros.core.errors import ArchiveError
from mql_ros.core.robot import BagEncoding, RobotSpec
from mql_ros.core.transitions import parse_episode_event


@dataclass
class VerifyReport:
    bags: list[BagReport]

    @property
    def ok(self) -> bool:
        return all(not b.problems for b in self.bags)

    def summary(self) -> str:
        lines = []
        for b in self.bags:
            status = "ok" if not b.problems else f"{len(b.problems)} problem(s)"
            dropped = f", {len(b.dropped)} step(s) cut at a boundary" if b.dropped else ""
            lines.append(f"{b.path}: {b.episodes} episodes, {b.transitions} transitions{dropped}, tasks {b.tasks}: "
                         f"{status}")
            lines += [f"  - {p}" for p in b.problems[:20]]
            if len(b.problems) > 20:
                lines.append(f"  - ... and {len(b.problems) - 20} more")
        lines.append(f"{len(self.bags)} bags, {sum(not b.problems for b in self.bags)} without problems")
        return "\n".join(lines)


def _check_metadata(bag: Path, report: BagReport) -> None:
    """metadata.yaml must exist, name the bag's files and storage, and agree with the messages actually read (a
    killed writer leaves none). The reader here does not need it; `ros2 bag info` and `ros2 bag play` do."""
    meta = bag / "metadata.yaml"
    if not meta.is_file():
        report.problems.append("no metadata.yaml: the writer did not finish this bag (killed?)")
        return
    try:
        info = yaml.safe_load(meta.read_text(encoding="utf-8"))["rosbag2_bagfile_information"]
        counts = {t["topic_metadata"]["name"]: int(t["message_count"]) for t in info["topics_with_message_count"]}
        files, storage = [str(f) for f in info["relative_file_paths"]], info["storage_identifier"]
    except (yaml.YAMLError, KeyError, TypeError, ValueError, OverflowError, RecursionError, OSError) as exc:
        # ValueError: not UTF-8 (UnicodeDecodeError), a message_count that is not an integer; OverflowError: .inf
        what = f"{type(exc).__name__}: " if not isinstance(exc, yaml.YAMLError) else ""
        report.problems.append(f"metadata.yaml is unreadable: {what}{str(exc)[:300]}")
        return
    for name in files:
        if not (bag / name).is_file():
            report.problems.append(f"metadata.yaml names {name}, which is not in the bag (ros2 bag cannot open it)")
    if storage != "mcap" and any(bag.glob("*.mcap")):
        report.problems.append(f"metadata.yaml says storage {storage!r}, the bag's files are MCAP (ros2 bag cannot "
                               "open it)")
    for topic, n in report.messages.items():
        if counts.get(topic, 0) != n:
            report.problems.append(f"{topic}: metadata.yaml says {counts.get(topic, 0)} messages, read {n}")


def verify_archive(directory: str | Path, robot: BagEncoding | None = None, cache: bool = False) -> VerifyReport:
    """Read every bag completely; report each problem (never skip one silently).

    Without `cache` (the default) every bag is read from its files, neither from nor into the columnar cache:
    the cache is keyed on sizes, mtimes and the files' last 64 KiB, so a bag damaged in the middle since it
    was cached (bit rot, a bad copy keeping mtimes) would still verify. `archive info` reads through it."""
    robot = robot or RobotSpec.from_urdf()
    reports = []
    for bag in bag_dirs(directory):
        try:
            _, report = read_bag(bag, robot, cache=True) if cache else _read_bag_uncached(bag, robot)
        except ArchiveError as exc:
            report = BagReport(str(bag), problems=[str(exc)])
        else:
            _check_metadata(bag, report)
        reports.append(report)
    if not reports:
        raise ArchiveError(f"{directory} holds no bags")
    return VerifyReport(reports)


def _read_bag_uncached(bag: Path, robot: BagEncoding) -> tuple[list[Episode], BagReport]:
    """read_bag without its cache: the bulk decoder (every chunk decompressed and its CRC checked) for the
    arm's regular bags, the per-message reader for anything else, as read_bag decodes on a cache miss."""
    if isinstance(robot, RobotSpec):
        try:
            decoded, counts = columnar.decode_bag(bag, robot, TYPESTORE, TOPICS)
        except columnar.Irregular:
            pass
        else:
            report = BagReport(str(bag), messages=counts)
            episodes = columnar.run_rule(decoded, robot, bag.name, 1.0, report)
            report.episodes, report.transitions = len(episodes), sum(len(e) for e in episodes)
            report.tasks = sorted({e.task_id for e in episodes})
            return episodes, report
    return read_bag_per_message(bag, robot)


_TASK_ID = re.compile(r"(.+)/(?:train|test|ood)/\d+")


def recorded_identity(directory: str | Path, max_messages: int = 1000
                      ) -> list[tuple[Path, tuple[str | None, tuple[tuple[str, ...], tuple[str, ...]] | None]]]:
    """Per bag under `directory`: (family, (arm joint names, gripper joint names)) as its first messages show
    them, from the first /mql/episode task id of the form "<family>/<split>/<i>" (what `train --archive`
    records) and the first /joint_states and /gripper/joint_states. None for what a bag does not show or
    cannot be read (`archive verify` reports such a bag). Read as a stream, at most `max_messages` per bag."""
    from mcap.reader import NonSeekingReader
    from mcap_ros2.decoder import DecoderFactory

    path = Path(directory).expanduser()
    if not path.is_dir():
        return []
    out = []
    for bag in bag_dirs(path):
        family, arm, gripper = None, None, None
        try:
            files = sorted(bag.glob("*.mcap"))
            with open(files[0], "rb") as f:
                factory, decoders = DecoderFactory(), {}
                for n, (schema, channel, message) in enumerate(
                        NonSeekingReader(f).iter_messages(log_time_order=False)):
                    if n >= max_messages or (family is not None and arm is not None and gripper is not None):
                        break
                    topic = channel.topic
                    wanted = {"/mql/episode": family, "/joint_states": arm, "/gripper/joint_states": gripper}
                    if topic not in wanted or wanted[topic] is not None or schema is None:
                        continue
                    if channel.id not in decoders:
                        decoders[channel.id] = factory.decoder_for(channel.message_encoding, schema)
                    msg = decoders[channel.id](message.data)
                    if topic == "/mql/episode":
                        match = _TASK_ID.fullmatch(str(parse_episode_event(msg.data).get("task_id", "")))
                        family = match.group(1) if match else family
                    elif topic == "/joint_states":
                        arm = tuple(msg.name)
                    else:
                        gripper = tuple(msg.name)
        except Exception:  # noqa: BLE001 -- a damaged or foreign bag shows what it shows; verify says the rest
            pass
        out.append((bag, (family, (arm, gripper) if arm is not None and gripper is not None else None)))
    return out


def archive_info(directory: str | Path, robot: BagEncoding | None = None) -> dict:
    """Per bag: tasks, episodes, transitions, message counts and problems; totals."""
    report = verify_archive(directory, robot, cache=True)
    return {"bags": [asdict(b) for b in report.bags],
            "episodes": sum(b.episodes for b in report.bags),
            "transitions": sum(b.transitions for b in report.bags),
            "tasks": sorted({t for b in report.bags for t in b.tasks}),
            "problems": sum(len(b.problems) for b in report.bags)}


def export_archive(directory: str | Path, out: str | Path, robot: BagEncoding | None = None,
                   warn: Callable[[str], None] | None = None) -> Path:
    """All transitions as flat arrays in one .npz (task_id, obs, action, reward, next_obs); returns the file
    written (`out`, with .npz added as numpy does). Bags read with problems are named to `warn`."""
    from mql_ros.archive.bags import load_episodes

    out = Path(out)
    out = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
    if out.is_dir():
        raise ArchiveError(f"{out} is a directory, not a file to write")
    episodes = load_episodes(directory, robot or RobotSpec.from_urdf(), warn=warn)
    if not episodes:
        raise ArchiveError(f"{directory} holds no episodes")
    np.savez_compressed(
        out, task_id=np.concatenate([[e.task_id] * len(e) for e in episodes]),
        obs=np.concatenate([e.observations[:-1] for e in episodes]),
        action=np.concatenate([e.actions for e in episodes]),
        reward=np.concatenate([e.rewards for e in episodes]),
        next_obs=np.concatenate([e.observations[1:] for e in episodes]))
    return out
