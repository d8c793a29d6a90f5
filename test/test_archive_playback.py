"""A recorded bag played into the running adaptation node gives it the transitions the offline reader gets.

The bag is recorded by the live graph (sim_arm + context_encoder + policy + adaptation, real processes), then
played, as `ros2 bag play` does (test/bag_player.py: recorded QoS, raw CDR bytes, recorded timing), into a
fresh adaptation node that saves each new-task episode it builds (`episodes_dir`). Those arrays must equal
`read_bag` of the same bag exactly: one step rule, online and offline.

What holds exactly, and when: ROS 2 orders messages within a topic, not across topics. A node takes the
messages waiting on several subscriptions in its executor's order, so the online stream equals the recorded
one only while the node keeps up with the player. The player spaces consecutive messages by 20 ms
(`--min-gap`), which a 2-core machine usually keeps up with; under load a stall of 40 ms lets the node take
a state before the command that preceded it (seen once in CI: rows 0-1 paired with the next state), on a
robot as in playback. So the replay node also records what it took, in the order it took it: its episode
must always be that stream under the step rule, and must equal the offline reading of the played bag
whenever that stream is the played one. A replay where the node fell behind is run again (three tries).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("rclpy")

from rosbags.rosbag2 import Reader  # noqa: E402
from rosgraph_helpers import ros_env  # noqa: E402
from std_msgs.msg import Float64MultiArray  # noqa: E402
from test_archive import assert_same_episodes  # noqa: E402

from mql_ros.archive import bag_dirs, read_bag, verify_archive  # noqa: E402
from mql_ros.core.episode import Episode  # noqa: E402
from mql_ros.core.errors import ArchiveError  # noqa: E402
from mql_ros.core.robot import RobotSpec  # noqa: E402
from mql_ros.nodes.common import RELIABLE_QOS  # noqa: E402

pytestmark = pytest.mark.ros
ROBOT = RobotSpec.from_urdf()
PLAYER = Path(__file__).resolve().parent / "bag_player.py"


def whole_episode_bags(archive: Path) -> list[Path]:
    """Finished bags holding one complete episode (start to end event) and no problem. (A step cut at the
    bag's start, a command that came before the episode's first state, is dropped online too.)"""
    try:
        bags = verify_archive(archive, ROBOT).bags
    except ArchiveError:
        return []
    return [Path(b.path) for b in bags if not b.problems and b.episodes == 1
            and b.transitions >= 10 and b.messages.get("/mql/episode", 0) == 2]


def test_bag_played_into_the_adaptation_node_gives_the_offline_transitions(ros_graph, tiny_checkpoint):
    archive = ros_graph.dir / "recorded"
    probe = ros_graph.probe
    probe.subscribe(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    ros_graph.start("sim_arm", sim_rate=25.0, episode_steps=15)
    ros_graph.start("context_encoder", checkpoint=str(tiny_checkpoint))
    ros_graph.start("policy", checkpoint=str(tiny_checkpoint), control_rate=25.0)
    ros_graph.start("adaptation", checkpoint=str(tiny_checkpoint), archive_dir=str(archive))
    bag = probe.wait_for(lambda: whole_episode_bags(archive), 120.0, "a recorded bag of one whole episode")[0]
    for node in list(ros_graph.nodes.values()):
        assert node.stop() == 0
    offline, report = read_bag(bag, ROBOT)
    assert len(offline) == 1 and not report.problems

    played = topic_order([bag])
    for attempt in range(3):
        saved, heard = ros_graph.dir / f"replayed_episodes_{attempt}", ros_graph.dir / f"replay_heard_{attempt}"
        replay = ros_graph.start("adaptation", name=f"adaptation_replay_{attempt}",
                                 checkpoint=str(tiny_checkpoint), episodes_dir=str(saved), archive_dir=str(heard))
        player = subprocess.run([sys.executable, str(PLAYER), str(bag), "--delay", "1.0", "--min-gap", "0.02"],
                                capture_output=True, text=True, timeout=120, env=ros_env(ros_graph.domain))
        assert player.returncode == 0, player.stderr[-3000:]
        files = probe.wait_for(lambda d=saved: sorted(d.glob("*.npz")), 20.0, "the replayed episode saved by the node")
        assert replay.stop() == 0
        assert len(files) == 1
        online = Episode.load(files[0])
        heard_bags = bag_dirs(heard)
        taken = [episode for b in heard_bags for episode in read_bag(b, ROBOT)[0]]
        assert_same_episodes([online], taken)  # online = offline, on the stream the node took
        if topic_order(heard_bags) == played:  # it kept up: that stream is the bag's
            assert_same_episodes([online], offline)
            return
    pytest.fail("the replay node fell behind the player on all three tries (a state taken before the command "
                "that preceded it): the machine is too loaded for this check")


def topic_order(bags: list[Path]) -> list[str]:
    """The topics of every message in these bags, in log-time order: the order a recorder took them."""
    order = []
    for path in bags:
        with Reader(path) as reader:
            order += [connection.topic for connection, _, _ in reader.messages()]
    return order

