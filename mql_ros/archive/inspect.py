"""`mql-ros archive info|verify|export`: what an archive holds and what is wrong with it, for humans."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import yaml

from mql_ros.archive.bags import BagReport, bag_dirs, read_bag
from mql_ros.core.errors import ArchiveError
from mql_ros.core.robot import BagEncoding, RobotSpec


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
        info = yaml.safe_load(meta.read_text())["rosbag2_bagfile_information"]
        counts = {t["topic_metadata"]["name"]: int(t["message_count"]) for t in info["topics_with_message_count"]}
        files, storage = [str(f) for f in info["relative_file_paths"]], info["storage_identifier"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        report.problems.append(f"metadata.yaml is unreadable: {exc}")
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


def verify_archive(directory: str | Path, robot: BagEncoding | None = None) -> VerifyReport:
    """Read every bag completely; report each problem (never skip one silently)."""
    robot = robot or RobotSpec.from_urdf()
    reports = []
    for bag in bag_dirs(directory):
        try:
            _, report = read_bag(bag, robot)
        except ArchiveError as exc:
            report = BagReport(str(bag), problems=[str(exc)])
        else:
            _check_metadata(bag, report)
        reports.append(report)
    if not reports:
        raise ArchiveError(f"{directory} holds no bags")
    return VerifyReport(reports)


def archive_info(directory: str | Path, robot: BagEncoding | None = None) -> dict:
    """Per bag: tasks, episodes, transitions, message counts and problems; totals."""
    report = verify_archive(directory, robot)
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
