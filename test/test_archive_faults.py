"""The archive under faults: a full disk, a read-only directory, and the adaptation node stopped by a signal.

Disk full and read-only are real: a small (or read-only) tmpfs is mounted for the test, which needs root
(skipped with the reason otherwise). Whatever fails, recording stops with an error naming the problem, bags
finished before it stay readable, and the node keeps running.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mql_ros.archive import ArchiveRecorder, read_bag, verify_archive
from mql_ros.core.errors import ArchiveError
from mql_ros.core.robot import RobotSpec

ROBOT = RobotSpec.from_urdf()


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs(options) -> a fresh directory with a tmpfs mounted on it (unmounted at teardown)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], check=False)


def record_episode(rec: ArchiveRecorder, t0: int, steps: int) -> int:
    arm, grip = ROBOT.action_to_commands(np.zeros(ROBOT.act_dim))
    t = t0
    rec.record_episode(t, json.dumps({"event": "start", "task_id": "full"}))
    for _ in range(steps):
        t += 40_000_000
        rec.record_joint_state("/joint_states", t, ROBOT.arm_joints, np.zeros(4), np.zeros(4))
        rec.record_joint_state("/gripper/joint_states", t, ROBOT.gripper_joints, [0.0, 0.0], [0.0, 0.0])
        rec.record_command("/arm_controller/commands", t + 1000, arm)
        rec.record_command("/gripper_controller/commands", t + 1000, grip)
        rec.record_reward(t + 2000, -1.0)
    rec.record_episode(t + 3000, json.dumps({"event": "end", "task_id": "full"}))
    return t + 40_000_000


def test_disk_full_stops_recording_with_a_clear_error_and_finished_bags_stay_readable(mount_tmpfs):
    archive = mount_tmpfs("size=256k")
    rec = ArchiveRecorder(archive, ROBOT)
    t, finished = 0, 0
    with pytest.raises(ArchiveError, match="No space left on device") as error:
        for _ in range(10_000):
            t = record_episode(rec, t, steps=20)
            finished += 1
    assert finished >= 2, "the tmpfs should hold a few episodes before it is full"
    assert rec.failed and "No space left" in rec.failed
    with pytest.raises(ArchiveError, match="recording stopped"):  # stays stopped, says why
        rec.record_reward(t, 0.0)
    report = verify_archive(archive, ROBOT)
    intact = [b for b in report.bags if not b.problems]
    assert len(intact) == finished and all(b.episodes == 1 and b.transitions == 20 for b in intact)
    assert all(b.problems for b in report.bags[finished:]), f"the bag cut by the full disk is reported: {error}"


def test_read_only_archive_directory_is_a_clear_error_naming_the_bag(mount_tmpfs):
    archive = mount_tmpfs("ro,size=64k")
    rec = ArchiveRecorder(archive, ROBOT)
    with pytest.raises(ArchiveError, match=r"cannot create bag .*Read-only file system"):
        rec.record_reward(0, 1.0)
    assert "Read-only" in rec.failed


# ----------------------------------------------------------------------------- the adaptation node process
pytest.importorskip("rclpy")
from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rosgraph_helpers import diagnostic_values, wait_collecting  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from mql_ros.nodes.common import RELIABLE_QOS  # noqa: E402


def start_recording_graph(graph, checkpoint, archive: Path, episode_steps: int) -> None:
    graph.probe.subscribe(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    graph.probe.subscribe(DiagnosticArray, "/diagnostics", 10)
    graph.start("sim_arm", sim_rate=50.0, episode_steps=episode_steps)
    graph.start("context_encoder", checkpoint=str(checkpoint))
    graph.start("policy", checkpoint=str(checkpoint), control_rate=50.0)
    graph.start("adaptation", checkpoint=str(checkpoint), archive_dir=str(archive),
                output_dir=str(graph.dir / "adapted"))


def bag_reports(archive: Path) -> list:
    try:
        return verify_archive(archive, ROBOT).bags
    except ArchiveError:  # no bag yet
        return []


def fill(directory: Path) -> None:
    """Take every free byte of the file system under `directory`, as another process filling the disk would."""
    try:
        with open(directory / "filler", "wb", buffering=0) as f:
            while True:
                f.write(b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc


@pytest.mark.ros
def test_adaptation_node_on_a_full_disk_stops_recording_and_the_graph_keeps_running(ros_graph, tiny_checkpoint,
                                                                                    mount_tmpfs):
    archive = mount_tmpfs("size=4m")
    probe = ros_graph.probe
    start_recording_graph(ros_graph, tiny_checkpoint, archive, episode_steps=10)
    probe.wait_for(lambda: any(b.transitions > 0 and not b.problems for b in bag_reports(archive)), 90.0,
                   "a finished bag holding transitions")
    fill(archive)
    probe.wait_for(lambda: any("recording stopped" in d["_message"] and "No space left" in d["_message"]
                               for d in diagnostic_values(probe, "adaptation")), 30.0,
                   "the adaptation node reporting the full disk on /diagnostics")
    assert "recording stopped" in ros_graph.nodes["adaptation"].log()
    n = len(probe.received("arm_controller/commands"))
    probe.wait_for(lambda: len(probe.received("arm_controller/commands")) > n + 25, 20.0,
                   "the control loop still commanding after the disk filled")
    assert probe.call(Trigger, "mql/rollback", Trigger.Request()).success  # its services still answer
    assert ros_graph.nodes["adaptation"].proc.poll() is None
    report = verify_archive(archive, ROBOT)
    finished = [b for b in report.bags if (Path(b.path) / "metadata.yaml").is_file()]
    assert all(not b.problems for b in finished), "bags finished before the disk filled stay readable"
    assert any(b.transitions > 0 for b in finished)
    assert len(report.bags) - len(finished) <= 1, "at most the bag being written when the disk filled is cut"


@pytest.mark.ros
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_adaptation_node_stopped_by_a_signal_mid_episode_exits_0_and_finishes_its_bag(ros_graph, tiny_checkpoint,
                                                                                      sig):
    archive = ros_graph.dir / "archive"
    probe = ros_graph.probe
    start_recording_graph(ros_graph, tiny_checkpoint, archive, episode_steps=100_000)  # one endless episode
    probe.wait_for(lambda: len(probe.received("arm_controller/commands")) > 50, 90.0, "the graph running")
    probe.wait_for(lambda: list(archive.glob("*/*.mcap")), 20.0, "a bag being recorded")
    wait_collecting(probe, "adaptation")
    assert not list(archive.glob("*/metadata.yaml")), "the episode has not ended, so no bag is finished yet"

    assert ros_graph.nodes["adaptation"].stop(sig, timeout=15.0) == 0
    bags = sorted(archive.glob("*/metadata.yaml"))
    assert len(bags) == 1, "the bag in progress is finished on the way out"
    episodes, report = read_bag(bags[0].parent, ROBOT)
    assert not report.problems, report.problems
    assert len(episodes) == 1 and len(episodes[0]) > 10, "the episode in progress is kept"


# ------------------------------------------------------------------------------------- archive verify
def _one_bag_archive(archive: Path, episodes: int = 10, steps: int = 50) -> Path:
    rec = ArchiveRecorder(archive, ROBOT, episodes_per_bag=episodes)
    t = 0
    for _ in range(episodes):
        t = record_episode(rec, t, steps)
    rec.close()
    (bag,) = [p for p in archive.iterdir() if not p.name.startswith(".")]
    return bag


def _cli(capsys, *args) -> tuple[int, str, str]:
    from mql_ros.cli import main

    rc = main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_verify_reads_every_bag_in_full_so_a_bag_damaged_in_the_middle_since_it_was_cached_fails(
        tmp_path, monkeypatch, capsys):
    """The decode cache is keyed on sizes, mtimes and the last 64 KiB: verify trusted it, and a bag damaged in
    the middle (bit rot, a bad copy keeping mtimes) still verified, exit 0."""
    monkeypatch.delenv("MQL_ARCHIVE_CACHE", raising=False)
    archive = tmp_path / "archive"
    bag = _one_bag_archive(archive)
    assert verify_archive(archive, ROBOT).ok
    assert not (archive / ".mql_cache").exists()  # verify neither reads nor writes the cache
    read_bag(bag, ROBOT)  # what adapt or export do: the cache now holds the bag
    assert (archive / ".mql_cache").is_dir()
    mcap = next(bag.glob("*.mcap"))
    st, data = mcap.stat(), bytearray(mcap.read_bytes())
    assert len(data) > 40_000 + 65_536
    data[20_000:40_000] = b"\xaa" * 20_000
    mcap.write_bytes(bytes(data))
    os.utime(mcap, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert read_bag(bag, ROBOT)[1].problems == []  # the cache cannot see it
    report = verify_archive(archive, ROBOT)
    assert not report.ok and report.bags[0].problems, report.summary()
    rc, out, _ = _cli(capsys, "archive", "verify", archive)
    assert rc == 2 and f"{bag}: " in out and "0 without problems" in out, out


def _topic_count(text: str, value: str) -> bytes:
    """metadata.yaml with the first topic's message_count replaced by `value`."""
    head, sep, topics = text.partition("topics_with_message_count:")
    return (head + sep + re.sub(r"message_count: \d+", f"message_count: {value}", topics, count=1)).encode()


@pytest.mark.parametrize("damage, problem", [
    (lambda text: b"\xb3\x9f" + text.encode(), "metadata.yaml is unreadable: UnicodeDecodeError"),
    (lambda text: _topic_count(text, "abc"), "metadata.yaml is unreadable: ValueError: invalid literal for int()"),
    (lambda text: _topic_count(text, ".inf"), "metadata.yaml is unreadable: OverflowError"),
], ids=["not-utf8", "count-not-an-integer", "count-inf"])
def test_verify_and_info_report_unreadable_metadata_naming_the_bag_and_exit_2(tmp_path, capsys, damage, problem):
    """These metadata.yaml ended verify and info with exit 1, "unexpected error", naming no bag."""
    archive = tmp_path / "archive"
    bag = _one_bag_archive(archive, episodes=1, steps=5)
    meta = bag / "metadata.yaml"
    meta.write_bytes(damage(meta.read_text()))
    report = verify_archive(archive, ROBOT)
    assert [p for p in report.bags[0].problems if p.startswith(problem)], report.summary()
    rc, out, err = _cli(capsys, "archive", "verify", archive)
    assert rc == 2 and f"{bag}: " in out and problem in out and not err, (out, err)
    rc, out, err = _cli(capsys, "archive", "info", archive)
    assert rc == 0 and problem in out and not err, (out, err)


def test_verify_of_a_bag_with_deeply_nested_json_episode_events_names_the_bag_and_exits_2(tmp_path, capsys):
    """json.loads raised RecursionError on it: exit 1, "unexpected error", no bag named."""
    from mql_ros.archive.bags import BagWriter

    bag = tmp_path / "archive" / "bag"
    writer = BagWriter(bag)
    writer.episode(1000, "[" * 200_000)
    writer.episode(2000, '{"event": "end"}')
    writer.close()
    rc, out, err = _cli(capsys, "archive", "verify", tmp_path / "archive")
    assert rc == 2 and f"{bag}: " in out and "episode event is not JSON: RecursionError" in out, (out, err)
