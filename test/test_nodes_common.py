"""The shared node plumbing: command pairing, JointState decoding (core.safety), realtime scheduling."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("rclpy")

from sensor_msgs.msg import JointState  # noqa: E402

from mql_ros.core.errors import InputError  # noqa: E402
from mql_ros.core.robot import RobotSpec  # noqa: E402
from mql_ros.core.safety import read_joint_state  # noqa: E402
from mql_ros.nodes.common import CommandPair  # noqa: E402

ROBOT = RobotSpec.from_urdf()


@pytest.mark.parametrize("first", ["arm", "gripper"])
def test_command_pair_completes_a_step_whichever_topic_arrives_first(first):
    pair = CommandPair()
    second = "gripper" if first == "arm" else "arm"
    values = {"arm": [0.1, 0.2, 0.3, 0.4], "gripper": [0.02]}
    assert pair.add(first, 10, values[first]) is None
    stamp, arm, grip = pair.add(second, 12, values[second])
    assert stamp == 10 and arm.tolist() == values["arm"] and grip.tolist() == values["gripper"]
    assert pair.add("arm", 20, values["arm"]) is None  # the pair was consumed: a new step starts


def test_command_pair_replaces_a_pending_command_whose_partner_was_lost():
    pair = CommandPair()
    pair.add("arm", 1, [0.0] * 4)
    pair.add("arm", 2, [0.5] * 4)
    stamp, arm, _ = pair.add("gripper", 3, [0.01])
    assert stamp == 2 and np.allclose(arm, 0.5)


def test_decode_joint_state_matches_by_name_not_index():
    names = list(ROBOT.arm_joints)[::-1] + ["some_other_joint"]
    msg = JointState(name=names, position=[4.0, 3.0, 2.0, 1.0, 9.0], velocity=[0.4, 0.3, 0.2, 0.1, 9.0])
    pos, vel = read_joint_state(ROBOT, msg.name, msg.position, msg.velocity, ROBOT.arm_joints, "joint state")
    assert pos.tolist() == [1.0, 2.0, 3.0, 4.0] and vel.tolist() == [0.1, 0.2, 0.3, 0.4]


@pytest.mark.parametrize("case, match", [
    ("nan", "NaN"), ("missing", "missing joints"), ("no_velocity", "no velocities"), ("short", "names but"),
    ("duplicate", "duplicated")])
def test_decode_joint_state_rejects_bad_messages_naming_the_problem(case, match):
    names, pos, vel = list(ROBOT.arm_joints), [0.0] * 4, [0.0] * 4
    if case == "nan":
        pos[2] = float("nan")
    elif case == "missing":
        names[0] = "unknown_joint"
    elif case == "no_velocity":
        vel = []
    elif case == "short":
        pos = pos[:3]
    else:
        names[1] = names[0]
    with pytest.raises(InputError, match=match):
        read_joint_state(ROBOT, names, pos, vel, ROBOT.arm_joints, "state")


def test_realtime_priority_zero_leaves_normal_scheduling():
    from mql_ros.nodes.common import set_realtime_priority

    assert set_realtime_priority(0) == "normal scheduling"
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


REALTIME_PROBE = """
import json, os, threading
from mql_ros.nodes.common import set_realtime_priority
threading.Thread(target=threading.Event().wait, daemon=True).start()  # an existing thread is moved too
said = set_realtime_priority(10)
later = []
new_thread = threading.Thread(target=lambda: later.append(os.sched_getscheduler(0)))  # inherits
new_thread.start()
new_thread.join()
threads = []
for tid in os.listdir("/proc/self/task"):
    try:
        threads.append(os.sched_getscheduler(int(tid)))
    except ProcessLookupError:  # ended since it was listed
        pass
print(json.dumps({"said": said, "threads": threads, "later": later}))
"""


def test_realtime_priority_moves_every_thread_to_sched_fifo_or_says_why_not():
    """In a child process, so this test process keeps normal scheduling. Without CAP_SYS_NICE or an rtprio
    limit the call is refused: the node is told why and nothing changes."""
    run = subprocess.run([sys.executable, "-c", REALTIME_PROBE], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    if "refused" in out["said"]:
        assert out["said"].startswith("SCHED_FIFO 10 refused")
        assert os.SCHED_FIFO not in out["threads"] + out["later"]
    else:
        assert out["said"].startswith("SCHED_FIFO 10 on ") and len(out["threads"]) >= 2
        assert set(out["threads"]) == {os.SCHED_FIFO} and out["later"] == [os.SCHED_FIFO]


CYCLIC_GARBAGE_PROBE = """
import sys, weakref
import torch  # noqa: F401  (a node's start-up heap: ~200k long-lived objects)
from mql_ros.nodes.common import freeze_startup_heap
if sys.argv[1] == "freeze":
    freeze_startup_heap()

class Bag:  # like a closed bag's writer: in use for a while, then cyclic garbage
    def __init__(self):
        self.me = self

refs, in_use, messages = [], [], []
for _ in range(300):
    bag = Bag()
    refs.append(weakref.ref(bag))
    in_use = in_use[-1:] + [bag]
    for _ in range(20):  # an episode's messages: allocations that live a while
        messages = messages[-50:] + [[[j] for j in range(100)]]
    del bag
print(sum(r() is not None for r in refs[:-2]))
"""


def test_freezing_the_startup_heap_lets_the_collector_free_cyclic_garbage_of_a_long_run():
    """Without the freeze, full collections wait for the heap to grow by a quarter of torch's objects, so a
    long-running node keeps its cyclic garbage (the control run shows that premise)."""
    def alive(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", CYCLIC_GARBAGE_PROBE, mode], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return int(run.stdout.split()[-1])

    assert alive("plain") > 0.9 * 298
    assert alive("freeze") < 0.5 * 298


def test_a_configure_cut_short_by_a_shutdown_is_not_reported_as_a_bad_configuration(monkeypatch):
    """A signal during start-up fails the configure transition; that was exit 2, "failed to configure" (found
    by an audit). With the context shut down, autostarted hands the node back and main_for exits 0."""
    from rclpy.lifecycle import TransitionCallbackReturn

    from mql_ros.core.errors import ConfigError
    from mql_ros.nodes import common

    class Failing:
        autostart = True
        diag = type("Diag", (), {"message": "starting"})()
        activated = False

        def trigger_configure(self):
            return TransitionCallbackReturn.FAILURE

        def trigger_activate(self):
            self.activated = True

    monkeypatch.setattr(common.rclpy, "ok", lambda: False)
    node = common.autostarted(Failing, "policy")()
    assert isinstance(node, Failing) and not node.activated
    monkeypatch.setattr(common.rclpy, "ok", lambda: True)
    with pytest.raises(ConfigError, match="policy failed to configure: starting"):
        common.autostarted(Failing, "policy")()
