"""The archive fast path (bulk decoding + columnar cache) gives exactly what per-message decoding gives."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mql_ros.archive import EpisodeArchiveWriter, columnar, load_episodes, read_bag
from mql_ros.archive.bags import TOPICS, TYPESTORE, BagWriter, bag_dirs, read_bag_per_message
from mql_ros.core.episode import Episode
from mql_ros.core.errors import InputError
from mql_ros.core.replay import EpisodeReplay, MultiTaskReplay
from mql_ros.core.robot import RobotSpec

JOINT_STATE_DEF = ("std_msgs/Header header\nstring[] name\nfloat64[] position\nfloat64[] velocity\nfloat64[] effort\n"
                   "================================================================================\n"
                   "MSG: std_msgs/Header\nbuiltin_interfaces/Time stamp\nstring frame_id\n"
                   "================================================================================\n"
                   "MSG: builtin_interfaces/Time\nint32 sec\nuint32 nanosec\n")
ARRAY_DEF = ("std_msgs/MultiArrayLayout layout\nfloat64[] data\n"
             "================================================================================\n"
             "MSG: std_msgs/MultiArrayLayout\nstd_msgs/MultiArrayDimension[] dim\nuint32 data_offset\n"
             "================================================================================\n"
             "MSG: std_msgs/MultiArrayDimension\nstring label\nuint32 size\nuint32 stride\n")


@pytest.fixture(scope="module")
def robot() -> RobotSpec:
    return RobotSpec.from_urdf()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("MQL_ARCHIVE_CACHE", raising=False)


def random_episodes(robot, n=4, steps=9, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        obs = rng.normal(size=(steps + 1, robot.obs_dim)).astype(np.float32)
        out.append(Episode(f"arm_reach/train/{i % 3}", obs, rng.uniform(-1, 1, (steps, robot.act_dim)),
                           rng.normal(size=steps)))
    return out


def write_archive(directory: Path, robot, episodes_per_bag=2, **kw) -> list[Episode]:
    episodes = random_episodes(robot, **kw)
    writer = EpisodeArchiveWriter(directory, robot, family="arm_reach", episodes_per_bag=episodes_per_bag)
    for e in episodes:
        writer.add(e)
    writer.close()
    return episodes


def assert_same(fast, slow):
    (fast_eps, fast_rep), (slow_eps, slow_rep) = fast, slow
    assert [e.task_id for e in fast_eps] == [e.task_id for e in slow_eps]
    for a, b in zip(fast_eps, slow_eps, strict=True):
        for name in ("observations", "actions", "rewards"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes(), name
    assert fast_rep.messages == slow_rep.messages
    assert (fast_rep.episodes, fast_rep.transitions, fast_rep.tasks) == \
        (slow_rep.episodes, slow_rep.transitions, slow_rep.tasks)
    assert fast_rep.problems == slow_rep.problems and fast_rep.dropped == slow_rep.dropped


def bulk_decodes(bag: Path, robot) -> bool:
    try:
        columnar.decode_bag(bag, robot, TYPESTORE, TOPICS)
    except columnar.Irregular:
        return False
    return True


def cache_entries(archive: Path) -> list[Path]:
    root = archive / columnar.CACHE_DIR_NAME
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_fast_path_is_bit_exact_with_per_message_decoding_on_our_bags(tmp_path, robot):
    written = write_archive(tmp_path, robot)
    for bag in bag_dirs(tmp_path):
        assert bulk_decodes(bag, robot)
        slow = read_bag_per_message(bag, robot)
        assert_same(read_bag(bag, robot), slow)  # cold: bulk decoding, writes the cache
        assert_same(read_bag(bag, robot), slow)  # warm: from the cache
    back = load_episodes(tmp_path, robot)
    for a, b in zip(written, back, strict=True):
        assert a.observations.tobytes() == b.observations.tobytes()
        assert a.actions.tobytes() == b.actions.tobytes()


def test_warm_load_serves_memory_mapped_arrays_without_decoding(tmp_path, robot, monkeypatch):
    write_archive(tmp_path, robot)
    cold = load_episodes(tmp_path, robot)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a warm load decoded a bag")

    monkeypatch.setattr(columnar, "decode_bag", no_decoding)
    monkeypatch.setattr("mql_ros.archive.bags.read_bag_per_message", no_decoding)
    warm = load_episodes(tmp_path, robot)
    assert isinstance(warm[0].observations.base, np.memmap) or isinstance(warm[0].observations, np.memmap)
    assert all(a.observations.tobytes() == b.observations.tobytes() for a, b in zip(cold, warm, strict=True))


def write_plain_record(bag: Path, robot, steps=12, gap_at=6, compression="zstd"):
    """A `ros2 bag record`-style bag from the independent mcap + mcap_ros2 writer: no /mql/episode, an
    episode boundary by a time gap, zstd chunks, joint names in another order than the robot's."""
    from mcap.writer import CompressionType
    from mcap_ros2.writer import Writer as McapWriter

    bag.mkdir()
    rng = np.random.default_rng(3)
    with open(bag / f"{bag.name}_0.mcap", "wb") as f:
        w = McapWriter(f, compression=CompressionType.ZSTD if compression == "zstd" else CompressionType.NONE)
        js = w.register_msgdef("sensor_msgs/msg/JointState", JOINT_STATE_DEF)
        arr = w.register_msgdef("std_msgs/msg/Float64MultiArray", ARRAY_DEF)
        f64 = w.register_msgdef("std_msgs/msg/Float64", "float64 data\n")
        arm_names = list(robot.arm_joints)[::-1]
        t = 0
        for k in range(steps):
            t += 40_000_000 + (3_000_000_000 if k == gap_at else 0)
            header = {"stamp": {"sec": t // 10**9, "nanosec": t % 10**9}, "frame_id": "base"}
            q = rng.normal(size=robot.n_arm)
            w.write_message("/joint_states", js, {"header": header, "name": arm_names, "position": list(q),
                                                  "velocity": list(-q), "effort": []}, log_time=t, publish_time=t)
            w.write_message("/gripper/joint_states", js,
                            {"header": header, "name": list(robot.gripper_joints),
                             "position": list(rng.uniform(0, 0.02, robot.n_gripper)),
                             "velocity": [0.0] * robot.n_gripper, "effort": []}, log_time=t, publish_time=t)
            arm, grip = robot.action_to_commands(rng.uniform(-1, 1, robot.act_dim))
            for topic, values in (("/arm_controller/commands", arm), ("/gripper_controller/commands", grip)):
                w.write_message(topic, arr, {"layout": {"dim": [], "data_offset": 0}, "data": list(values)},
                                log_time=t + 5, publish_time=t + 5)
            if k != 2:  # a missing reward: the latest one is reused
                w.write_message("/mql/reward", f64, {"data": float(rng.normal())}, log_time=t + 7,
                                publish_time=t + 7)
        w.finish()


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_fast_path_reads_a_plain_recording_from_the_independent_mcap_writer(tmp_path, robot, compression):
    bag = tmp_path / "plain_record"
    write_plain_record(bag, robot, compression=compression)
    assert bulk_decodes(bag, robot)
    slow = read_bag_per_message(bag, robot, task_id="robot_task")
    assert len(slow[0]) == 2  # the gap split it
    assert_same(read_bag(bag, robot, task_id="robot_task"), slow)
    assert_same(read_bag(bag, robot, task_id="robot_task"), slow)


def test_messages_written_out_of_log_time_order_are_ordered_the_same_by_both_paths(tmp_path, robot):
    bag = BagWriter(tmp_path / "backwards")
    for t, q in ((10, 0.0), (30, 1.0), (20, 2.0), (40, 3.0)):  # log times out of order in the file
        bag.joint_state("/joint_states", t, robot.arm_joints, np.full(robot.n_arm, q), np.zeros(robot.n_arm))
        bag.joint_state("/gripper/joint_states", t, robot.gripper_joints, np.zeros(2), np.zeros(2))
        arm, grip = robot.action_to_commands(np.zeros(robot.act_dim))
        bag.command("/arm_controller/commands", t + 1, arm)
        bag.command("/gripper_controller/commands", t + 1, grip)
        bag.reward(t + 2, q)
    bag.close()
    slow = read_bag_per_message(tmp_path / "backwards", robot)
    assert slow[0][0].observations[:, 0].tolist() == [0, 2, 1, 3]  # log-time order
    assert bulk_decodes(tmp_path / "backwards", robot)
    assert_same(read_bag(tmp_path / "backwards", robot), slow)


def test_changed_bag_invalidates_its_cache_entry(tmp_path, robot):
    write_archive(tmp_path, robot, episodes_per_bag=4)
    (bag,) = bag_dirs(tmp_path)
    first, _ = read_bag(bag, robot)
    (old_entry,) = cache_entries(tmp_path)
    shutil.rmtree(bag)
    write_archive(tmp_path / "new", robot, episodes_per_bag=4, seed=1)
    (new_bag,) = bag_dirs(tmp_path / "new")
    shutil.move(str(new_bag), str(bag))  # same bag name, other content
    second, _ = read_bag(bag, robot)
    assert first[0].observations.tobytes() != second[0].observations.tobytes()
    assert_same(read_bag(bag, robot), read_bag_per_message(bag, robot))
    (entry,) = cache_entries(tmp_path)  # the stale entry was replaced
    assert entry != old_entry


def test_cache_key_of_a_bag_being_closed_ignores_the_writers_temporary_and_vanished_files(tmp_path, robot,
                                                                                          monkeypatch):
    write_archive(tmp_path, robot, episodes_per_bag=4)
    (bag,) = bag_dirs(tmp_path)
    key = columnar.cache_key(bag, robot, None, 1.0)
    (bag / "metadata.yaml.tmp").write_text("rosbag2_bagfile_information: {")  # rosbags' writer, mid-close
    assert columnar.cache_key(bag, robot, None, 1.0) == key
    gone = bag / "renamed_meanwhile.mcap"  # listed as a file, then renamed away before it is read
    listing, is_file = Path.iterdir, Path.is_file
    monkeypatch.setattr(Path, "iterdir", lambda self: [*listing(self), gone] if self == bag else listing(self))
    monkeypatch.setattr(Path, "is_file", lambda self: True if self == gone else is_file(self))
    assert columnar.cache_key(bag, robot, None, 1.0) == key


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate", "delete_meta", "garbage_meta"])
def test_corrupt_cache_entry_is_rebuilt_never_trusted(tmp_path, robot, damage):
    write_archive(tmp_path, robot, episodes_per_bag=4)
    (bag,) = bag_dirs(tmp_path)
    reference = read_bag_per_message(bag, robot)
    read_bag(bag, robot)
    (entry,) = cache_entries(tmp_path)
    target = entry / "observations.npy"
    if damage == "flip_a_byte":
        data = bytearray(target.read_bytes())
        data[-3] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        os.truncate(target, target.stat().st_size // 2)
    elif damage == "delete_meta":
        (entry / "meta.json").unlink()
    else:
        (entry / "meta.json").write_text("{not json")
    assert columnar.read_cache(entry) is None
    assert_same(read_bag(bag, robot), reference)
    assert columnar.read_cache(entry) is not None  # rebuilt


def test_truncated_bag_gives_the_same_recovered_data_and_report_on_both_paths(tmp_path, robot):
    write_archive(tmp_path, robot, episodes_per_bag=4, n=4, steps=30)
    (bag,) = bag_dirs(tmp_path)
    (tmp_path / bag.name / "metadata.yaml").unlink()  # a killed writer leaves no metadata.yaml
    (mcap,) = bag.glob("*.mcap")
    os.truncate(mcap, mcap.stat().st_size * 2 // 3)
    assert not bulk_decodes(bag, robot)  # irregular: the per-message reader recovers and reports
    slow = read_bag_per_message(bag, robot)
    assert slow[1].problems
    assert_same(read_bag(bag, robot), slow)
    assert_same(read_bag(bag, robot), slow)  # and from the cache


@pytest.mark.parametrize("irregularity", ["varying_names", "nan_state", "wrong_command_length"])
def test_irregular_bags_fall_back_to_per_message_decoding(tmp_path, robot, irregularity):
    path = tmp_path / "odd"
    bag = BagWriter(path)
    bag.episode(0, json.dumps({"event": "start", "task_id": "odd"}))
    for k in range(6):
        t = (k + 1) * 1000
        names = list(robot.arm_joints)
        q = np.full(robot.n_arm, float(k))
        if irregularity == "varying_names" and k == 3:
            names, q = names[::-1], q[::-1].copy()
        if irregularity == "nan_state" and k == 2:
            q[0] = np.nan
        bag.joint_state("/joint_states", t, names, q, np.zeros(robot.n_arm))
        bag.joint_state("/gripper/joint_states", t, robot.gripper_joints, np.zeros(2), np.zeros(2))
        arm, grip = robot.action_to_commands(np.zeros(robot.act_dim))
        if irregularity == "wrong_command_length" and k == 4:
            arm = arm[:-1]
        bag.command("/arm_controller/commands", t + 1, arm)
        bag.command("/gripper_controller/commands", t + 1, grip)
        bag.reward(t + 2, float(k))
    bag.episode(7000, json.dumps({"event": "end", "task_id": "odd"}))
    bag.close()
    assert not bulk_decodes(path, robot)
    slow = read_bag_per_message(path, robot)
    assert slow[0]
    assert_same(read_bag(path, robot), slow)


def test_other_message_types_on_contract_topics_are_still_rejected(tmp_path, robot):
    from rosbags.rosbag2 import StoragePlugin, Writer

    path = tmp_path / "wrong_types"
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as w:
        conn = w.add_connection("/mql/reward", "std_msgs/msg/String", typestore=TYPESTORE)
        w.write(conn, 1, TYPESTORE.serialize_cdr(TYPESTORE.types["std_msgs/msg/String"](data="x"),
                                                 "std_msgs/msg/String"))
    with pytest.raises(Exception, match="std_msgs/msg/Float64"):
        read_bag(path, robot)


def test_unwritable_cache_location_reads_without_a_cache(tmp_path, robot, monkeypatch):
    write_archive(tmp_path / "archive", robot)
    reference = load_episodes(tmp_path / "archive", robot, cache=False)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("MQL_ARCHIVE_CACHE", str(tmp_path / "a_file" / "cache"))  # cannot be created
    back = load_episodes(tmp_path / "archive", robot)
    assert [e.observations.tobytes() for e in back] == [e.observations.tobytes() for e in reference]


@st.composite
def message_streams(draw):
    """Random contract message streams: episode events (some malformed), gaps, missing or repeated
    rewards, lone commands, states missing, log times out of order."""
    events = []
    t = 0
    for _ in range(draw(st.integers(1, 40))):
        t += draw(st.sampled_from([1, 1000, 40_000_000, 2_000_000_000]))
        kind = draw(st.sampled_from(["arm", "grip", "arm_cmd", "grip_cmd", "reward", "start", "end", "bad_event"]))
        jitter = draw(st.sampled_from([0, 0, 0, -500]))  # sometimes written before the previous message
        events.append((kind, max(0, t + jitter), draw(st.floats(-1, 1))))
    return events


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=message_streams(), with_metadata=st.booleans())
def test_fast_path_equals_per_message_path_on_random_streams(tmp_path_factory, robot, stream, with_metadata):
    path = tmp_path_factory.mktemp("random") / "bag"
    bag = BagWriter(path)
    for kind, t, x in stream:
        if kind == "arm":
            bag.joint_state("/joint_states", t, robot.arm_joints, np.full(robot.n_arm, x), np.full(robot.n_arm, -x))
        elif kind == "grip":
            bag.joint_state("/gripper/joint_states", t, robot.gripper_joints, np.full(2, x), np.zeros(2))
        elif kind in ("arm_cmd", "grip_cmd"):
            arm, grip = robot.action_to_commands(np.full(robot.act_dim, x))
            bag.command("/arm_controller/commands" if kind == "arm_cmd" else "/gripper_controller/commands", t,
                        arm if kind == "arm_cmd" else grip)
        elif kind == "reward":
            bag.reward(t, x)
        elif kind == "bad_event":
            bag.episode(t, "[1, 2]")
        else:
            bag.episode(t, json.dumps({"event": kind, "task_id": f"task{int(x * 3)}"}))
    bag.close()
    if not with_metadata:
        (path / "metadata.yaml").unlink()
    slow = read_bag_per_message(path, robot, task_id="default", episode_gap_s=1.0)
    assert_same(read_bag(path, robot, task_id="default"), slow)
    assert_same(read_bag(path, robot, task_id="default"), slow)  # from the cache


def assert_batches_equal(a, b):
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f.name


@pytest.mark.parametrize("history_len", [1, 4, 30])
def test_episode_replay_gives_multitask_replay_batches_without_copying(tmp_path, robot, history_len):
    write_archive(tmp_path, robot, n=5, steps=12)
    load_episodes(tmp_path, robot)
    episodes = load_episodes(tmp_path, robot)  # warm: views of memory-mapped cache files
    assert isinstance(episodes[0].observations.base, np.memmap)
    episodes.append(Episode("terminal", np.ones((4, robot.obs_dim)), np.zeros((3, robot.act_dim)), np.ones(3),
                            terminated=True))
    mapped, in_ram = EpisodeReplay(history_len, episodes), MultiTaskReplay(history_len)
    for e in episodes:
        in_ram.add_episode(e)
    assert mapped.task_ids() == in_ram.task_ids()
    assert [mapped.num_transitions(k) for k in [None, *in_ram.task_ids(), "nope"]] == \
        [in_ram.num_transitions(k) for k in [None, *in_ram.task_ids(), "nope"]]
    assert_batches_equal(mapped.all_transitions(), in_ram.all_transitions())
    for task in in_ram.task_ids():
        assert_batches_equal(mapped.recent(task, 7), in_ram.recent(task, 7))
    batch = mapped.sample(64, np.random.default_rng(0), task_ids=["terminal"])
    assert (batch.task_index == mapped.task_ids().index("terminal")).all()
    assert len(mapped.sample(32, np.random.default_rng(1))) == 32
    with pytest.raises(InputError, match="no task"):
        mapped.sample(4, np.random.default_rng(0), task_ids=["nope"])
