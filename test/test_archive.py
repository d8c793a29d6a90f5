"""The rosbag2 archive: round trip, independent writers, damaged bags, bad content, and SIGKILL."""

import gc
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
import yaml

from mql_ros.archive import ArchiveRecorder, EpisodeArchiveWriter, load_episodes, read_bag, verify_archive
from mql_ros.archive.bags import TOPICS, bag_dirs
from mql_ros.core.episode import Episode
from mql_ros.core.errors import AdaptationCancelled, ArchiveError
from mql_ros.core.robot import RobotSpec

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def robot() -> RobotSpec:
    return RobotSpec.from_urdf()


def random_episodes(robot, n=3, steps=7, seed=0):
    rng = np.random.default_rng(seed)
    lo = np.concatenate([robot.arm_lower, [robot.gripper_lower]])
    out = []
    for i in range(n):
        obs = rng.normal(size=(steps + 1, robot.obs_dim)).astype(np.float32)
        obs[:, : robot.n_arm] = np.clip(obs[:, : robot.n_arm], lo[: robot.n_arm], None)
        out.append(Episode(f"arm_reach/train/{i % 2}", obs, rng.uniform(-1, 1, (steps, robot.act_dim)),
                           rng.normal(size=steps)))
    return out


def assert_same_episodes(got: list[Episode], want: list[Episode]) -> None:
    """Bit-exact: task ids, observations, actions and rewards."""
    assert [e.task_id for e in got] == [e.task_id for e in want]
    for a, b in zip(want, got, strict=True):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)

def write_archive(directory: Path, robot, episodes: list[Episode], episodes_per_bag: int = 20,
                  family: str = "train") -> list[Path]:
    """The episodes through EpisodeArchiveWriter; the bags it wrote."""
    writer = EpisodeArchiveWriter(directory, robot, family=family, episodes_per_bag=episodes_per_bag)
    for e in episodes:
        writer.add(e)
    writer.close()
    return bag_dirs(directory)


def test_episodes_round_trip_bit_exact_through_bags(tmp_path, robot):
    episodes = random_episodes(robot)
    assert len(write_archive(tmp_path, robot, episodes, episodes_per_bag=2, family="arm_reach")) == 2
    assert_same_episodes(load_episodes(tmp_path, robot), episodes)


def test_loading_an_archive_stops_between_bags_when_asked_and_a_later_load_reads_everything(tmp_path, robot):
    """The adaptation node loads its replay_dir in a worker; a shutdown could not stop a large archive's load."""
    episodes = random_episodes(robot, n=6, steps=4)
    bags = write_archive(tmp_path, robot, episodes, episodes_per_bag=2)
    asked = []

    def stop_after_first_bag() -> bool:
        asked.append(1)
        return len(asked) > 1

    with pytest.raises(AdaptationCancelled, match=f"before {bags[1]} \\(2 episodes read\\)"):
        load_episodes(tmp_path, robot, stop=stop_after_first_bag)
    assert_same_episodes(load_episodes(tmp_path, robot, stop=lambda: False), episodes)


def test_written_bags_have_rosbag2_metadata_with_true_counts(tmp_path, robot):
    (bag,) = write_archive(tmp_path, robot, random_episodes(robot, n=2, steps=4), episodes_per_bag=5)
    info = yaml.safe_load((bag / "metadata.yaml").read_text())["rosbag2_bagfile_information"]
    assert info["storage_identifier"] == "mcap"
    counts = {t["topic_metadata"]["name"]: t["message_count"] for t in info["topics_with_message_count"]}
    types = {t["topic_metadata"]["name"]: t["topic_metadata"]["type"] for t in info["topics_with_message_count"]}
    assert types == TOPICS
    assert counts["/arm_controller/commands"] == 8 and counts["/mql/episode"] == 4
    assert counts["/joint_states"] == 10  # one state per step plus the final state, per episode
    assert verify_archive(tmp_path, robot).ok


def test_bag_from_an_independent_mcap_writer_is_read(tmp_path, robot):
    from mcap_ros2.writer import Writer as McapWriter

    schemas = {"sensor_msgs/msg/JointState": "std_msgs/Header header\nstring[] name\nfloat64[] position\n"
               "float64[] velocity\nfloat64[] effort\n"
               "================================================================================\n"
               "MSG: std_msgs/Header\nbuiltin_interfaces/Time stamp\nstring frame_id\n"
               "================================================================================\n"
               "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec\n",
               "std_msgs/msg/Float64MultiArray": "std_msgs/MultiArrayLayout layout\nfloat64[] data\n"
               "================================================================================\n"
               "MSG: std_msgs/MultiArrayLayout\nstd_msgs/MultiArrayDimension[] dim\nuint32 data_offset\n"
               "================================================================================\n"
               "MSG: std_msgs/MultiArrayDimension\nstring label\nuint32 size\nuint32 stride\n",
               "std_msgs/msg/Float64": "float64 data\n"}
    bag = tmp_path / "plain_record"
    bag.mkdir()
    with open(bag / "plain_record_0.mcap", "wb") as f:
        w = McapWriter(f)
        reg = {name: w.register_msgdef(name, text) for name, text in schemas.items()}
        n, q = robot.n_arm, np.zeros(robot.n_arm)
        arm, grip = robot.action_to_commands(np.zeros(robot.act_dim))
        for k in range(5):
            t = k * 40_000_000
            header = {"stamp": {"sec": 0, "nanosec": t}, "frame_id": ""}
            w.write_message("/joint_states", reg["sensor_msgs/msg/JointState"],
                            {"header": header, "name": list(robot.arm_joints), "position": list(q + k),
                             "velocity": [0.0] * n, "effort": []}, log_time=t, publish_time=t)
            w.write_message("/gripper/joint_states", reg["sensor_msgs/msg/JointState"],
                            {"header": header, "name": list(robot.gripper_joints), "position": [0.01, 0.01],
                             "velocity": [0.0, 0.0], "effort": []}, log_time=t + 1, publish_time=t + 1)
            for topic, values in (("/arm_controller/commands", arm), ("/gripper_controller/commands", grip)):
                w.write_message(topic, reg["std_msgs/msg/Float64MultiArray"],
                                {"layout": {"dim": [], "data_offset": 0}, "data": list(values)},
                                log_time=t + 2, publish_time=t + 2)
            w.write_message("/mql/reward", reg["std_msgs/msg/Float64"], {"data": -float(k)}, log_time=t + 3,
                            publish_time=t + 3)
        w.finish()
    episodes, report = read_bag(bag, robot, task_id="robot_task")
    assert not report.problems, report.problems
    (episode,) = episodes  # no /mql/episode topic: one episode, task id from the caller
    assert episode.task_id == "robot_task" and len(episode) == 4
    np.testing.assert_array_equal(episode.rewards, [0, -1, -2, -3])
    np.testing.assert_array_equal(episode.observations[:, 0], [0, 1, 2, 3, 4])


def test_truncated_bag_is_reported_and_earlier_bags_stay_readable(tmp_path, robot):
    first, second = write_archive(tmp_path, robot, random_episodes(robot, n=2, steps=30), episodes_per_bag=1)
    mcap = next(second.glob("*.mcap"))
    mcap.write_bytes(mcap.read_bytes()[: mcap.stat().st_size // 2])
    report = verify_archive(tmp_path, robot)
    assert not report.ok
    (bad,) = [b for b in report.bags if b.problems]
    assert bad.path == str(second)
    assert len(load_episodes(first, robot)) == 1


def test_corrupt_bag_raises_an_error_naming_it(tmp_path, robot):
    bag = tmp_path / "junk"
    bag.mkdir()
    (bag / "junk_0.mcap").write_bytes(b"this is not an mcap file" * 10)
    with pytest.raises(ArchiveError, match="junk"):
        load_episodes(bag, robot)


def test_wrong_joint_names_are_reported_with_the_name(tmp_path, robot):
    rec = ArchiveRecorder(tmp_path, robot)
    rec.record_joint_state("/joint_states", 0, ["elbow", "b", "c", "d"], [0.0] * 4, [0.0] * 4)
    rec.close()
    _, report = read_bag(bag_dirs(tmp_path)[0], robot)
    assert any("missing joints" in p and "base_yaw_joint" in p for p in report.problems)


def test_bag_with_right_topic_names_but_other_types_is_rejected(tmp_path, robot):
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_KILTED)
    bag = tmp_path / "wrong_types"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conn = w.add_connection("/mql/reward", "std_msgs/msg/String", typestore=ts)
        w.write(conn, 1, ts.serialize_cdr(ts.types["std_msgs/msg/String"](data="x"), "std_msgs/msg/String"))
    with pytest.raises(ArchiveError, match="/mql/reward has type std_msgs/msg/String"):
        load_episodes(bag, robot)


def test_missing_or_read_only_archive_directory_is_a_clear_error(tmp_path, robot):
    with pytest.raises(ArchiveError, match="does not exist"):
        load_episodes(tmp_path / "nope", robot)
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("")
        with pytest.raises(ArchiveError, match="cannot create"):
            ArchiveRecorder(blocker / "sub", robot)
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ArchiveError):
            ArchiveRecorder(ro / "sub", robot).record_reward(0, 1.0)


def test_sigkill_mid_episode_loses_only_the_episode_in_progress(tmp_path, robot):
    script = textwrap.dedent(f"""
        import json, sys, time
        import numpy as np
        from mql_ros.archive import ArchiveRecorder
        from mql_ros.core.robot import RobotSpec
        robot = RobotSpec.from_urdf()
        rec = ArchiveRecorder({str(tmp_path)!r}, robot)
        arm, grip = robot.action_to_commands(np.zeros(robot.act_dim))
        t = 0
        for episode in range(3):
            rec.record_episode(t, json.dumps({{"event": "start", "task_id": "t"}}))
            for k in range(5 if episode < 2 else 10**9):
                t += 40_000_000
                rec.record_joint_state("/joint_states", t, robot.arm_joints, np.zeros(4), np.zeros(4))
                rec.record_joint_state("/gripper/joint_states", t, robot.gripper_joints, [0.0, 0.0], [0.0, 0.0])
                rec.record_command("/arm_controller/commands", t + 1, arm)
                rec.record_command("/gripper_controller/commands", t + 1, grip)
                rec.record_reward(t + 2, -1.0)
                if episode == 2 and k == 3:
                    print("in third episode", flush=True)
            rec.record_episode(t + 3, json.dumps({{"event": "end", "task_id": "t"}}))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "in third episode"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    report = verify_archive(tmp_path, robot)
    finished = [b for b in report.bags if not b.problems]
    assert len(finished) == 2 and all(b.episodes == 1 and b.transitions == 5 for b in finished)
    assert len(report.bags) == 3  # the partial bag is reported, not skipped
    assert any("metadata.yaml" in p or "stopped reading" in p for p in report.bags[-1].problems), report.bags[-1]


def test_recorder_frees_each_closed_bag_without_waiting_for_the_cyclic_collector(tmp_path, robot):
    """A node runs for days and full collections are rare in a process holding torch, so a closed bag's
    writer must go by reference counting alone (rosbags' Writer and its Connections refer to each other)."""
    recorder = ArchiveRecorder(tmp_path, robot)
    writers = []
    gc.disable()
    try:
        for episode in range(3):
            recorder.record_episode(episode, json.dumps({"event": "start", "task_id": "t", "episode": episode}))
            writers.append(weakref.ref(recorder._current()._writer))
            recorder.record_episode(episode, json.dumps({"event": "end", "task_id": "t", "episode": episode}))
        assert [w() is None for w in writers] == [True] * 3
    finally:
        gc.enable()
    assert len(bag_dirs(tmp_path)) == 3


def cut_before_summary(bag: Path) -> None:
    """Leave the .mcap as a writer killed after its last chunk leaves it: the data, no summary, no footer."""
    mcap = next(bag.glob("*.mcap"))
    data = mcap.read_bytes()
    # the file ends: footer record (opcode, length, summary_start, summary_offset_start, crc), then the magic
    (summary_start,) = struct.unpack_from("<Q", data, len(data) - 8 - 20)
    assert 0 < summary_start < len(data)
    mcap.write_bytes(data[:summary_start])


def test_mcap_cut_before_its_summary_gives_every_message_before_the_cut(tmp_path, robot):
    episodes = random_episodes(robot, n=2, steps=20)
    (bag,) = write_archive(tmp_path, robot, episodes, episodes_per_bag=2)
    (bag / "metadata.yaml").unlink()
    cut_before_summary(bag)
    got, report = read_bag(bag, robot, cache=False)
    assert_same_episodes(got, episodes)
    assert any("stopped reading" in p for p in report.problems), report.problems


def test_bag_cut_before_its_summary_is_read_as_a_stream_reported_and_its_siblings_stay_usable(tmp_path, robot):
    episodes = random_episodes(robot, n=3, steps=20)
    first, cut, last = write_archive(tmp_path, robot, episodes, episodes_per_bag=1)
    cut_before_summary(cut)  # metadata.yaml still there: rosbags needs the summary, so it cannot open the bag
    report = verify_archive(tmp_path, robot)
    assert [bool(b.problems) for b in report.bags] == [False, True, False]
    assert any("rosbags" in p and "cannot open" in p for p in report.bags[1].problems), report.bags[1].problems
    warnings: list[str] = []
    assert_same_episodes(load_episodes(tmp_path, robot, warn=warnings.append), episodes)
    assert [w.split(":")[0] for w in warnings] == [f"bag {cut}"]


def test_verify_flags_metadata_naming_files_or_storage_the_bag_does_not_have(tmp_path, robot):
    episodes = random_episodes(robot, n=2, steps=5)
    renamed, relabelled = write_archive(tmp_path, robot, episodes, episodes_per_bag=1)
    mcap = next(renamed.glob("*.mcap"))
    mcap.rename(mcap.with_name("renamed.mcap"))
    meta = relabelled / "metadata.yaml"
    meta.write_text(meta.read_text().replace("storage_identifier: mcap", "storage_identifier: sqlite3"))
    report = verify_archive(tmp_path, robot)
    assert any(f"names {mcap.name}, which is not in the bag" in p for p in report.bags[0].problems)
    assert any("says storage 'sqlite3'" in p for p in report.bags[1].problems)
    assert_same_episodes(load_episodes(tmp_path, robot), episodes)  # the data themselves are intact


def test_load_episodes_names_each_bag_with_problems_and_what_it_kept(tmp_path, robot):
    rec = ArchiveRecorder(tmp_path, robot)
    rec.record_joint_state("/joint_states", 0, ["elbow", "b", "c", "d"], [0.0] * 4, [0.0] * 4)
    rec.close()
    (bag,) = bag_dirs(tmp_path)
    warnings: list[str] = []
    assert load_episodes(tmp_path, robot, warn=warnings.append) == []
    assert len(warnings) == 1 and f"bag {bag}: 1 problem(s)" in warnings[0] and "missing joints" in warnings[0]
    assert "kept 0 episodes" in warnings[0]
    with pytest.warns(UserWarning, match="missing joints"):  # no callback: still not silent
        load_episodes(tmp_path, robot)


def test_recorder_refuses_a_directory_that_is_itself_a_bag(tmp_path, robot):
    (bag,) = write_archive(tmp_path, robot, random_episodes(robot, n=1))
    with pytest.raises(ArchiveError, match="is itself a bag"):
        ArchiveRecorder(bag, robot)
    assert bag_dirs(tmp_path) == [bag]


def test_report_of_a_moved_archive_names_the_bag_where_it_is_now(tmp_path, robot):
    import shutil

    rec = ArchiveRecorder(tmp_path / "before", robot)
    rec.record_joint_state("/joint_states", 0, ["elbow", "b", "c", "d"], [0.0] * 4, [0.0] * 4)
    rec.close()
    (bag,) = bag_dirs(tmp_path / "before")
    read_bag(bag, robot)  # writes the columnar cache beside the bag
    shutil.copytree(tmp_path / "before", tmp_path / "after")  # copy2: mtimes kept, so the cache stays current
    shutil.rmtree(tmp_path / "before")
    moved = tmp_path / "after" / bag.name
    _, report = read_bag(moved, robot)
    assert report.path == str(moved) and report.problems


def test_a_file_given_as_a_bag_is_a_clear_error_naming_its_directory(tmp_path, robot):
    (bag,) = write_archive(tmp_path, robot, random_episodes(robot, n=1))
    with pytest.raises(ArchiveError, match=f"is a file: give the bag directory that holds it \\({bag}\\)"):
        load_episodes(next(bag.glob("*.mcap")), robot)


def test_export_writes_and_returns_the_npz_file_it_names(tmp_path, robot):
    from mql_ros.archive import export_archive

    write_archive(tmp_path / "archive", robot, random_episodes(robot, n=1))
    out = export_archive(tmp_path / "archive", tmp_path / "flat", robot)
    assert out == tmp_path / "flat.npz" and out.is_file()
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(ArchiveError, match="is a directory"):
        export_archive(tmp_path / "archive", tmp_path / "dir.npz", robot)
