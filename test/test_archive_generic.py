"""Generic gymnasium families on the contract topics (BoxSpec): archived, read back and adapted from bags."""

import gymnasium
import numpy as np
import pytest
from test_archive import assert_same_episodes
from test_cli import run_cli

from mql_ros.archive import EpisodeArchiveWriter, load_episodes, read_bag
from mql_ros.archive.bags import bag_dirs
from mql_ros.core.checkpoint import bag_encoding, load_checkpoint
from mql_ros.core.episode import Episode
from mql_ros.core.errors import ArchiveError, InputError
from mql_ros.core.robot import BoxSpec, RobotSpec, spec_from_dict

TINY = "start_steps: 100\nhistory_len: 20\nhidden_sizes: [16, 16]\nbatch_size: 16\n"


def random_box_episodes(spec: BoxSpec, n: int = 3, steps: int = 6, seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    return [Episode(f"custom/train/{i}", rng.normal(size=(steps + 1, spec.obs_dim)).astype(np.float32),
                    rng.uniform(-1, 1, (steps, spec.act_dim)), rng.normal(size=steps)) for i in range(n)]


def test_generic_family_episodes_round_trip_bit_exact_through_bags(tmp_path):
    spec = BoxSpec(obs_dim=5, act_dim=3)
    episodes = random_box_episodes(spec)
    writer = EpisodeArchiveWriter(tmp_path, spec, family="custom", episodes_per_bag=2)
    for e in episodes:
        writer.add(e)
    writer.close()
    assert len(bag_dirs(tmp_path)) == 2
    assert_same_episodes(load_episodes(tmp_path, spec), episodes)


def test_box_encoding_puts_observations_on_joint_states_and_actions_on_the_arm_command(tmp_path):
    spec = BoxSpec(obs_dim=2, act_dim=1)
    writer = EpisodeArchiveWriter(tmp_path, spec, family="custom")
    writer.add(Episode("custom/train/0", np.array([[1, 2], [3, 4]], np.float32), np.array([[0.5]]),
                       np.array([-1.0])))
    writer.close()
    from rosbags.rosbag2 import Reader

    from mql_ros.archive.bags import TYPESTORE

    (bag,) = bag_dirs(tmp_path)
    seen = {}
    with Reader(bag) as reader:
        for conn, _, raw in reader.messages():
            seen.setdefault(conn.topic, TYPESTORE.deserialize_cdr(raw, conn.msgtype))
    assert list(seen["/joint_states"].name) == ["obs_0", "obs_1"]
    assert seen["/joint_states"].position.tolist() == [1.0, 2.0]
    assert seen["/joint_states"].velocity.tolist() == [0.0, 0.0]
    assert len(seen["/gripper/joint_states"].name) == 0
    assert seen["/arm_controller/commands"].data.tolist() == [0.5]
    assert len(seen["/gripper_controller/commands"].data) == 0


def test_episode_of_other_dims_than_the_encoding_is_refused_naming_both(tmp_path):
    writer = EpisodeArchiveWriter(tmp_path, BoxSpec(5, 3), family="custom")
    with pytest.raises(ArchiveError, match="obs/act dims 2/1.*5/3"):
        writer.add(random_box_episodes(BoxSpec(2, 1), n=1)[0])
    writer.close()


def test_arm_bag_read_with_a_box_encoding_names_the_missing_joints(tmp_path):
    robot = RobotSpec.from_urdf()
    rng = np.random.default_rng(0)
    writer = EpisodeArchiveWriter(tmp_path, robot, family="arm_reach")
    obs = np.clip(rng.normal(size=(4, robot.obs_dim)), -0.5, 0.5).astype(np.float32)
    writer.add(Episode("arm_reach/train/0", obs, rng.uniform(-1, 1, (3, robot.act_dim)), rng.normal(size=3)))
    writer.close()
    episodes, report = read_bag(bag_dirs(tmp_path)[0], BoxSpec(robot.obs_dim, robot.act_dim))
    assert not episodes
    assert any("missing joints ['obs_0'" in p for p in report.problems), report.problems


def test_box_encoding_rejects_nonzero_velocities_and_non_box_spaces():
    spec = BoxSpec(2, 1)
    with pytest.raises(InputError, match="velocities must be zeros"):
        spec.observation([1.0, 2.0], [0.0, 0.1], [], [])
    with pytest.raises(InputError, match="1-D Box spaces only; the action space is Discrete"):
        BoxSpec.from_spaces(gymnasium.spaces.Box(-1, 1, (3,)), gymnasium.spaces.Discrete(4), "family 'x'")
    with pytest.raises(InputError, match="obs_dim must be a positive integer"):
        BoxSpec(0, 1)
    with pytest.raises(InputError, match="unknown encoding 'tape'"):
        spec_from_dict({"encoding": "tape"})
    assert spec_from_dict(spec.to_dict()) == spec


def test_point_family_trained_with_archive_adapts_from_bags_alone(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY)
    r = run_cli("train", "--family", "point_goal", "--steps", "200", "--config", "tiny.yaml", "--out", "point.pt",
                "--archive", "archive", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(tmp_path / "point.pt").robot == BoxSpec(1, 1), "the checkpoint stores its encoding"

    r = run_cli("archive", "verify", "archive", "--family", "point_goal", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "10 episodes, 200 transitions" in r.stdout
    r = run_cli("archive", "verify", "archive", cwd=tmp_path)
    assert r.returncode == 2, "read as the arm (the default), a point bag has none of the arm's joints"

    archived = load_episodes(tmp_path / "archive", bag_encoding(load_checkpoint(tmp_path / "point.pt")))
    new_task_bag = tmp_path / "new_task"
    writer = EpisodeArchiveWriter(new_task_bag, BoxSpec(1, 1), family="point_goal")
    writer.add(Episode("point_goal/test/0", archived[0].observations, archived[0].actions,
                       archived[0].rewards + 1.0))
    writer.close()
    r = run_cli("adapt", "--checkpoint", "point.pt", "--archive", "archive", "--bags", "new_task",
                "--task-id", "point_goal/test/0", "--out", "adapted.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "new transitions: 20, archived transitions: 200" in r.stdout
    assert load_checkpoint(tmp_path / "adapted.pt").robot == BoxSpec(1, 1)
