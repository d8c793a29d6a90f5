"""The whole node graph over DDS: sim_arm + context_encoder + policy (+ adaptation), as separate processes."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")
pytest.importorskip("mql_ros.core.transitions")  # the context encoder's step rule (archive issue)

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rosgraph_helpers import (  # noqa: E402
    assert_holds_once_the_last_state_is_stale,
    diagnostic_values,
    wait_control_loop_connected,
)
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float32MultiArray, Float64MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from mql_ros.core.robot import RobotSpec  # noqa: E402
from mql_ros.core.runtime import DeployedPolicy  # noqa: E402
from mql_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS  # noqa: E402

pytestmark = pytest.mark.ros
ROBOT = RobotSpec.from_urdf()


def watch(probe) -> None:
    probe.subscribe(JointState, "joint_states", RELIABLE_QOS)  # as the sim writes them: the probe gets every one
    probe.subscribe(Float32MultiArray, "mql/context", RELIABLE_QOS)
    probe.subscribe(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    probe.subscribe(Float64MultiArray, "gripper_controller/commands", RELIABLE_QOS)
    probe.subscribe(String, "mql/episode", LATCHED_QOS)
    probe.subscribe(String, "mql/policy_update", LATCHED_QOS)
    probe.subscribe(DiagnosticArray, "/diagnostics", 10)


def first_pushed_ns(probe) -> int | None:
    """When the encoder wrote its first non-zero context (a pushed step), in source-timestamp ns."""
    times, contexts = probe.published_ns("mql/context"), probe.received("mql/context")
    # A context may arrive between the two reads: the shorter list is the aligned prefix.
    return next((t for t, m in zip(times, contexts, strict=False) if np.any(m.data)), None)


def start_graph(graph, checkpoint, rate: float = 25.0, episode_steps: int = 25):
    graph.start("sim_arm", sim_rate=rate, episode_steps=episode_steps)
    graph.start("context_encoder", checkpoint=str(checkpoint))
    graph.start("policy", checkpoint=str(checkpoint), control_rate=rate)


def test_graph_publishes_a_context_every_step_and_commands_within_limits(ros_graph, tiny_checkpoint):
    probe = ros_graph.probe
    watch(probe)
    start_graph(ros_graph, tiny_checkpoint)
    context_dim = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT).context_dim
    ends = lambda: sum(json.loads(m.data)["event"] == "end" for m in probe.received("mql/episode"))  # noqa: E731
    probe.wait_for(lambda: probe.received("arm_controller/commands"), 90.0, "the first command")
    # The encoder's first step: from here on it has matched every topic it needs (on a loaded machine DDS
    # discovery of the reward publisher can lag the commands by seconds, and a step without its reward is
    # dropped), so what follows is the steady state this test is about.
    def encoder_status() -> list:
        return diagnostic_values(probe, "context_encoder")[-1:]

    first_step_ns = probe.wait_for(lambda: first_pushed_ns(probe), 30.0,
                                   lambda: f"a context from a pushed step; encoder: {encoder_status()}")
    first_end = ends()
    probe.wait_for(lambda: ends() >= first_end + 3, 30.0, "three full episodes with the policy running")

    commands = probe.stamped("arm_controller/commands")
    grips = probe.received("gripper_controller/commands")
    arm = np.array([m.data for _, m in commands])
    lo, hi = ROBOT.command_lower, ROBOT.command_upper
    assert np.all(np.isfinite(arm)) and np.all(arm >= lo[:4]) and np.all(arm <= hi[:4])
    assert all(lo[4] <= g.data[0] <= hi[4] for g in grips)
    times = np.array(probe.published_ns("arm_controller/commands")[-40:]) / 1e9  # the policy's clock, not ours
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 18.0 < rate < 32.0, f"commands at {rate:.1f} Hz, control_rate 25"

    contexts = probe.stamped("mql/context")
    assert all(len(m.data) == context_dim and np.all(np.isfinite(m.data)) for _, m in contexts)
    # One context per control step (the encoder publishes when the reward that followed a command arrives), no gap:
    # counted over a window from the first pushed step, since the probe may receive the two topics in
    # either order. Times are when the nodes wrote the messages (DDS source timestamps), so a stall of this
    # test process (a long pytest run's garbage collection) is not taken for a gap in the encoder.
    t_cmd = np.array(probe.published_ns("arm_controller/commands")) / 1e9
    t_ctx = np.array(probe.published_ns("mql/context")) / 1e9
    zero = np.array([not np.any(m.data) for m in probe.received("mql/context")])[: len(t_ctx)]
    lo_t, hi_t = first_step_ns / 1e9, t_cmd[-1]
    n_cmd = np.sum((t_cmd > lo_t) & (t_cmd <= hi_t))
    window = (t_ctx > lo_t) & (t_ctx <= hi_t)
    in_window, starts = t_ctx[window], zero[window][:-1]
    assert len(in_window) >= 0.9 * n_cmd, (len(in_window), n_cmd, encoder_status(), ros_graph.logs())
    gaps = np.diff(in_window)
    # After an episode start's zero context the first step's context comes with the reward after the episode's
    # first command (it came with the second command, 0.10-0.15 s later, when the context lagged a step); within
    # an episode a context follows every reward (0.04 s).
    assert np.max(gaps[~starts]) < 0.25, "a gap of several control periods without a context"
    assert not starts.any() or np.max(gaps[starts]) < 0.4, "an episode's first context came late"
    # The context is reset to zeros at every episode start, and is not zero once steps were pushed.
    assert any(np.allclose(m.data, 0.0) for _, m in contexts)
    assert any(not np.allclose(m.data, 0.0) for _, m in contexts)


def test_graph_policy_holds_last_sim_positions_within_state_timeout_when_the_sim_stops(ros_graph,
                                                                                       tiny_checkpoint):
    probe = ros_graph.probe
    watch(probe)
    start_graph(ros_graph, tiny_checkpoint, episode_steps=100000)
    wait_control_loop_connected(probe)
    ros_graph.nodes["sim_arm"].stop(signal.SIGINT)
    assert_holds_once_the_last_state_is_stale(probe, time.time_ns())
    assert ros_graph.nodes["sim_arm"].proc.returncode == 0  # clean shutdown on SIGINT


def test_graph_adapt_publishes_a_validated_update_the_nodes_load_and_rollback_restores(ros_graph,
                                                                                       tiny_checkpoint):
    probe = ros_graph.probe
    watch(probe)
    config = ros_graph.dir / "slow_adapt.yaml"
    config.write_text("adapt:\n  new_task_iters: 10\n  archive_iters: 800\n")
    ros_graph.start("adaptation", checkpoint=str(tiny_checkpoint), config_file=str(config),
                    output_dir=str(ros_graph.dir / "adapted"), held_out_episodes=1, margin=10.0)
    meta_sha = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT).sha256

    # Asked before the sim runs, so that nothing can have been collected yet (with the sim already running,
    # 0.3 s episodes could fill the node before the service answered): refused, and it says why.
    early = probe.call(Trigger, "mql/adapt", Trigger.Request())
    assert not early.success and "episodes" in early.message
    start_graph(ros_graph, tiny_checkpoint, rate=50.0, episode_steps=15)
    probe.wait_for(lambda: any(int(d.get("new_episodes", "0")) >= 2
                               for d in diagnostic_values(probe, "adaptation")),
                   90.0, "two new-task episodes")
    started = probe.call(Trigger, "mql/adapt", Trigger.Request())
    assert started.success, started.message
    busy = probe.call(Trigger, "mql/adapt", Trigger.Request())
    assert not busy.success and "already running" in busy.message

    def update_sha() -> str | None:
        updates = [json.loads(m.data) for m in probe.received("mql/policy_update")]
        return updates[-1]["sha256"] if updates else None

    new_sha = probe.wait_for(lambda: update_sha() not in (None, meta_sha) and update_sha(), 120.0,
                             "a validated policy update")
    for node in ("policy", "context_encoder"):
        probe.wait_for(lambda n=node: diagnostic_values(probe, n)[-1].get("checkpoint_sha256") == new_sha,
                       30.0, f"{node} running the adapted checkpoint")
    n_cmd = len(probe.received("arm_controller/commands"))
    probe.wait_for(lambda: len(probe.received("arm_controller/commands")) > n_cmd + 10, 10.0,
                   "commands from the adapted policy")

    assert probe.call(Trigger, "mql/rollback", Trigger.Request()).success
    for node in ("policy", "context_encoder"):
        probe.wait_for(lambda n=node: diagnostic_values(probe, n)[-1].get("checkpoint_sha256") == meta_sha,
                       30.0, f"{node} back on the meta-trained checkpoint")


def test_graph_policy_holds_when_the_context_encoder_dies(ros_graph, tiny_checkpoint):
    probe = ros_graph.probe
    watch(probe)
    start_graph(ros_graph, tiny_checkpoint, episode_steps=100000)
    wait_control_loop_connected(probe)
    probe.wait_for(lambda: any(d["_message"] == "running" for d in diagnostic_values(probe, "policy")), 90.0,
                   "the policy acting on a fresh context")
    ros_graph.nodes["context_encoder"].stop(signal.SIGKILL)
    probe.wait_for(lambda: "context is" in diagnostic_values(probe, "policy")[-1]["_message"], 10.0,
                   lambda: "the policy holding because the context went stale (its status: "
                           f"{diagnostic_values(probe, 'policy')[-1]['_message']!r})")
    # Holding = commanding the measured positions: the latest command equals a recent joint state.
    states = [np.array(m.position) for m in probe.received("joint_states")[-10:]]
    last_cmd = np.array(probe.received("arm_controller/commands")[-1].data)
    assert any(np.allclose(last_cmd, s, atol=1e-9) for s in states)
