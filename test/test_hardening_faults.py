"""Faults with real node processes over DDS: SIGKILLed nodes, a diverging adaptation, SIGTERM/SIGINT.

Each test waits on conditions (never sleeps) and checks what the robot would see: the commands.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rosgraph_helpers import (  # noqa: E402
    ROOT,
    assert_holds_once_the_last_state_is_stale,
    diagnostic_values,
    wait_collecting,
    wait_control_loop_connected,
)
from sensor_msgs.msg import JointState  # noqa: E402
from std_msgs.msg import Float64MultiArray, String  # noqa: E402
from std_srvs.srv import Trigger  # noqa: E402

from mql_ros.archive import read_bag, verify_archive  # noqa: E402
from mql_ros.core.robot import RobotSpec  # noqa: E402
from mql_ros.core.runtime import DeployedPolicy  # noqa: E402
from mql_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS, checkpoint_path  # noqa: E402

pytestmark = pytest.mark.ros
ROBOT = RobotSpec.from_urdf()


@pytest.fixture
def other_checkpoint(tmp_path) -> Path:
    """A second valid checkpoint with the tiny one's context size (so the policy may switch to it)."""
    import torch

    from mql_ros.core.checkpoint import save_checkpoint
    from mql_ros.core.config import load_config
    from mql_ros.core.td3 import TD3Context

    torch.set_num_threads(1)
    cfg = load_config(overrides={"hidden_sizes": [32, 32], "context_dim": 8, "history_len": 50,
                                 "batch_size": 32})
    path = tmp_path / "other.pt"
    save_checkpoint(path, TD3Context(cfg, ROBOT.obs_dim, ROBOT.act_dim, seed=5), "arm_reach", ROBOT)
    return path


def watch(probe) -> None:
    # Reliable, as the sim writes them: the probe sees every state the sim sent, whichever the policy drops.
    probe.subscribe(JointState, "joint_states", RELIABLE_QOS)
    probe.subscribe(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    probe.subscribe(String, "mql/policy_update", LATCHED_QOS)
    probe.subscribe(DiagnosticArray, "/diagnostics", 10)


def start_control(graph, checkpoint: Path, episode_steps: int = 100_000) -> None:
    graph.start("sim_arm", sim_rate=50.0, episode_steps=episode_steps)
    graph.start("context_encoder", checkpoint=str(checkpoint))
    graph.start("policy", checkpoint=str(checkpoint), control_rate=50.0)


def commands(probe) -> int:
    return len(probe.received("arm_controller/commands"))


def policy_status(probe) -> dict:
    values = diagnostic_values(probe, "policy")
    return values[-1] if values else {"_message": "", "checkpoint_sha256": ""}


def finished_bags(archive: Path) -> set[Path]:
    return {p.parent for p in archive.glob("*/metadata.yaml")}


def wait_acting(probe, timeout: float = 90.0) -> None:
    """The control loop connected end to end and the policy acting on it."""
    wait_control_loop_connected(probe, timeout)
    probe.wait_for(lambda: policy_status(probe)["_message"] == "running", timeout,
                   lambda: f"the policy acting (its status: {policy_status(probe)['_message']!r})")


def adapt_on_two_episodes(graph, checkpoint: Path, **params):
    """The control loop with 15-step episodes and an adaptation node (`params`); once it holds two new-task
    episodes, ask it to adapt. Returns the adaptation node's process."""
    start_control(graph, checkpoint, episode_steps=15)
    node = graph.start("adaptation", checkpoint=str(checkpoint), output_dir=str(graph.dir / "adapted"), **params)
    graph.probe.wait_for(lambda: any(int(d.get("new_episodes", "0")) >= 2
                                     for d in diagnostic_values(graph.probe, "adaptation")),
                         90.0, "two new-task episodes")
    started = graph.probe.call(Trigger, "mql/adapt", Trigger.Request())
    assert started.success, started.message
    return node


def test_sigkill_of_the_adaptation_node_loses_only_its_open_bag_and_a_restart_records_a_new_one(
        ros_graph, tiny_checkpoint, other_checkpoint):
    probe = ros_graph.probe
    watch(probe)
    archive = ros_graph.dir / "archive"
    start_control(ros_graph, tiny_checkpoint)
    adaptation = ros_graph.start("adaptation", checkpoint=str(other_checkpoint), archive_dir=str(archive),
                                 output_dir=str(ros_graph.dir / "adapted"))
    wait_acting(probe)
    # The adaptation node publishes its (valid) checkpoint: the policy switches to it, its last good one.
    other_sha = DeployedPolicy.from_checkpoint(other_checkpoint, ROBOT).sha256
    assert probe.call(Trigger, "mql/rollback", Trigger.Request()).success
    probe.wait_for(lambda: policy_status(probe)["checkpoint_sha256"] == other_sha, 30.0,
                   "the policy running the adaptation node's checkpoint")
    for n in (1, 2):  # two finished episodes with recorded steps -> two finished bags
        wait_collecting(probe, "adaptation")
        assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
        probe.wait_for(lambda n=n: len(finished_bags(archive)) >= n, 20.0, f"finished bag {n}")
    before = finished_bags(archive)
    probe.wait_for(lambda: [p for p in archive.glob("*/*.mcap") if p.parent not in before], 20.0,
                   "the next bag being written")
    wait_collecting(probe, "adaptation")

    adaptation.interrupt(signal.SIGKILL)
    assert adaptation.proc.wait(10) == -signal.SIGKILL
    report = verify_archive(archive, ROBOT)
    intact = [b for b in report.bags if Path(b.path) in before]
    assert len(intact) == 2 and all(not b.problems and b.transitions > 0 for b in intact), intact
    partial = [b for b in report.bags if Path(b.path) not in before]
    assert len(partial) == 1 and partial[0].problems, "verify reports the bag cut by the SIGKILL"
    cli = subprocess.run([sys.executable, "-m", "mql_ros.cli", "archive", "verify", str(archive)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 2 and Path(partial[0].path).name in cli.stdout + cli.stderr, cli

    n = commands(probe)
    probe.wait_for(lambda: commands(probe) > n + 50, 10.0, "the control loop running without adaptation")
    assert policy_status(probe)["checkpoint_sha256"] == other_sha, "still on its last good checkpoint"
    wait_acting(probe, 10.0)  # a loaded machine can make it hold for a tick; it must be acting again

    ros_graph.start("adaptation", name="adaptation_restarted", checkpoint=str(other_checkpoint),
                    archive_dir=str(archive), output_dir=str(ros_graph.dir / "adapted"))
    seen = {Path(b.path) for b in report.bags}
    probe.wait_for(lambda: [p for p in archive.glob("*/*.mcap") if p.parent not in seen], 60.0,
                   "the restarted node recording into a new bag")
    # The restarted node also receives the latched /mql/episode history; it must not split the episode in
    # progress into extra bags: one bag per episode end from here on, the second one a whole episode.
    for n in (1, 2):
        wait_collecting(probe, "adaptation", steps=30)  # same node name, a new process
        assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
        probe.wait_for(lambda n=n: len(finished_bags(archive) - seen) >= n, 20.0, f"new bag {n} finished")
    new_bags = sorted(finished_bags(archive) - seen)
    assert len(new_bags) == 2, new_bags
    episodes, whole = read_bag(new_bags[1], ROBOT)
    assert not whole.problems and len(episodes) == 1 and len(episodes[0]) > 25, whole


def test_with_the_control_loop_running_the_sim_keeps_its_rate_and_the_policy_never_holds_on_a_stale_state(
        ros_graph, tiny_checkpoint):
    """The fault tests below rely on the healthy loop being healthy. On rclpy's MultiThreadedExecutor the sim
    spent ~56% CPU polling futures and published 16-39 of its 50 states/s; the policy then held ("joint state
    is 0.3 s old") with nothing killed, and the fault tests failed on the wrong hold reason."""
    probe = ros_graph.probe
    watch(probe)
    start_control(ros_graph, tiny_checkpoint)
    wait_acting(probe)
    held_before = int(policy_status(probe)["held_ticks"])
    start_ns = time.time_ns()
    time.sleep(4.0)
    # Publication times in the sim process (DDS source timestamps): a stall of this test process is not the sim's.
    sent = np.array(probe.published_ns("joint_states"))
    sent = sent[sent > start_ns + 0.5e9] / 1e9
    rate = (len(sent) - 1) / (sent[-1] - sent[0])
    assert rate > 45.0, f"the sim published {rate:.1f} states/s, sim_rate 50"
    held = int(policy_status(probe)["held_ticks"]) - held_before
    assert held == 0, f"the policy held {held} ticks with every node running: {policy_status(probe)['_message']!r}"


def test_sigkill_of_the_sim_makes_the_policy_hold_within_state_timeout_and_act_again_when_state_returns(
        ros_graph, tiny_checkpoint):
    probe = ros_graph.probe
    watch(probe)
    start_control(ros_graph, tiny_checkpoint)
    wait_acting(probe)
    ros_graph.nodes["sim_arm"].interrupt(signal.SIGKILL)
    ros_graph.nodes["sim_arm"].proc.wait(10)
    assert_holds_once_the_last_state_is_stale(probe, time.time_ns())

    ros_graph.start("sim_arm", name="sim_arm_restarted", sim_rate=50.0, episode_steps=100_000)
    probe.wait_for(lambda: policy_status(probe)["_message"] == "running", 60.0,
                   "the policy acting again on the restarted sim's state")
    assert ros_graph.nodes["policy"].proc.poll() is None


def test_when_the_context_encoder_dies_the_policy_holds_and_acts_again_when_it_returns(ros_graph,
                                                                                      tiny_checkpoint):
    probe = ros_graph.probe
    watch(probe)
    start_control(ros_graph, tiny_checkpoint)
    wait_acting(probe)
    ros_graph.nodes["context_encoder"].interrupt(signal.SIGKILL)
    probe.wait_for(lambda: "context is" in policy_status(probe)["_message"], 5.0,
                   lambda: f"the policy holding on a stale context (its status: {policy_status(probe)['_message']!r})")
    n = commands(probe)
    probe.wait_for(lambda: commands(probe) > n + 10, 5.0, "hold commands")
    # The state a hold repeats can reach the probe after the hold itself (two publishers): wait for it.
    hold = np.array(probe.received("arm_controller/commands")[-1].data)
    probe.wait_for(lambda: any(np.array_equal(hold, m.position) for m in probe.received("joint_states")[-20:]),
                   2.0, f"the hold {hold.tolist()} to be a recent measured position")
    ros_graph.start("context_encoder", name="context_encoder_restarted", checkpoint=str(tiny_checkpoint))
    # The restarted encoder waits for the next episode start (its step rule needs one) and publishes then.
    assert probe.call(Trigger, "sim/reset", Trigger.Request()).success
    probe.wait_for(lambda: policy_status(probe)["_message"] == "running", 60.0,
                   "the policy acting on the restarted encoder's context")


def test_a_diverging_adaptation_is_refused_by_validation_and_nothing_is_published(ros_graph):
    """Adam at lr 1 (the largest adapt.lr the config allows) on the shipped checkpoint: the critic explodes
    (held-out Bellman score about -1e8 against -0.09 here), so validation must refuse it. An untrained
    checkpoint would not do: its critic is so inconsistent that even a wild update can score better."""
    shipped = Path(checkpoint_path(""))
    if not shipped.is_file():
        pytest.skip("no shipped checkpoint")
    probe = ros_graph.probe
    watch(probe)
    config = ros_graph.dir / "diverge.yaml"
    config.write_text("adapt:\n  lr: 1.0\n  new_task_iters: 10\n  archive_iters: 0\n")
    meta_sha = DeployedPolicy.from_checkpoint(shipped, ROBOT).sha256
    adapt_on_two_episodes(ros_graph, shipped, config_file=str(config))
    probe.wait_for(lambda: any("adapted policy refused" in d["_message"]
                               for d in diagnostic_values(probe, "adaptation")), 60.0,
                   "validation refusing the diverged policy")
    assert probe.received("mql/policy_update") == [], "nothing was published, so nothing to roll back"
    assert not list((ros_graph.dir / "adapted").glob("*.pt")), "no checkpoint written for a refused update"
    n = commands(probe)
    probe.wait_for(lambda: commands(probe) > n + 25, 10.0, "the control loop still running")
    assert policy_status(probe)["checkpoint_sha256"] == meta_sha


def test_a_signal_during_a_long_adaptation_stops_it_and_the_node_exits_0(ros_graph, tiny_checkpoint):
    """A torch update still running in the worker thread at interpreter exit aborted the node ("terminate
    called without an active exception", exit -6; found by an audit): close() now stops it between updates."""
    probe = ros_graph.probe
    watch(probe)
    config = ros_graph.dir / "long.yaml"
    config.write_text("adapt:\n  new_task_iters: 100000\n  archive_iters: 0\n")  # hours of updates
    node = adapt_on_two_episodes(ros_graph, tiny_checkpoint, config_file=str(config))
    probe.wait_for(lambda: any(d.get("state") == "running" for d in diagnostic_values(probe, "adaptation")), 20.0,
                   "the adaptation running")
    time.sleep(1.0)  # well inside its updates
    begun = time.monotonic()
    node.interrupt(signal.SIGTERM)
    assert node.proc.wait(15) == 0, f"exit status {node.proc.returncode}\n{node.log()[-3000:]}"
    assert time.monotonic() - begun < 10.0



def test_a_rollback_during_an_adaptation_abandons_it_so_the_meta_checkpoint_stays(ros_graph, tiny_checkpoint):
    """An adaptation still running when /mql/rollback came used to publish its result afterwards, undoing
    the rollback without a word (found by an audit)."""
    probe = ros_graph.probe
    watch(probe)
    config = ros_graph.dir / "long.yaml"
    config.write_text("adapt:\n  new_task_iters: 100000\n  archive_iters: 0\n")  # hours of updates
    adapt_on_two_episodes(ros_graph, tiny_checkpoint, config_file=str(config))
    probe.wait_for(lambda: any(d.get("state") == "running" for d in diagnostic_values(probe, "adaptation")), 20.0,
                   "the adaptation running")
    rollback = probe.call(Trigger, "mql/rollback", Trigger.Request())
    assert rollback.success and "abandoned" in rollback.message, rollback.message
    probe.wait_for(lambda: diagnostic_values(probe, "adaptation")[-1].get("state") == "idle", 20.0,
                   "the adaptation stopped")
    assert any("adaptation abandoned: /mql/rollback" in d["_message"] for d in diagnostic_values(probe, "adaptation"))
    meta_sha = DeployedPolicy.from_checkpoint(tiny_checkpoint, ROBOT).sha256
    assert [json.loads(m.data)["sha256"] for m in probe.received("mql/policy_update")] == [meta_sha]
    assert not list((ros_graph.dir / "adapted").glob("*.pt"))


def test_a_signal_while_the_node_loads_a_large_archive_stops_the_load_and_the_node_exits_0_promptly(
        ros_graph, tiny_checkpoint):
    """The adaptation node loads its replay_dir in the worker on the first adaptation; close() waits 5 s for
    the worker and a load of a large archive ran on past it (asked to stop only between updates)."""
    from mql_ros.archive import EpisodeArchiveWriter
    from mql_ros.core.episode import Episode

    rng = np.random.default_rng(0)
    one = ros_graph.dir / "one"
    writer = EpisodeArchiveWriter(one, ROBOT, family="arm_reach", episodes_per_bag=1)
    writer.add(Episode("arm_reach/train/0", np.zeros((6, ROBOT.obs_dim), np.float32),
                       rng.uniform(-1, 1, (5, ROBOT.act_dim)), rng.normal(size=5)))
    writer.close()
    (bag,) = [p.parent for p in one.glob("*/metadata.yaml")]
    replay = ros_graph.dir / "replay"
    for i in range(600):  # a copy is read like any bag: about 10 ms each here, so seconds of loading
        shutil.copytree(bag, replay / f"bag_{i:04d}")
    probe = ros_graph.probe
    watch(probe)
    node = adapt_on_two_episodes(ros_graph, tiny_checkpoint, replay_dir=str(replay))
    probe.wait_for(lambda: "loading the archive" in node.log(), 20.0, "the node loading its archive")
    begun = time.monotonic()
    node.interrupt(signal.SIGTERM)
    assert node.proc.wait(15) == 0, f"exit status {node.proc.returncode}\n{node.log()[-3000:]}"
    elapsed = time.monotonic() - begun
    log = node.log()
    assert f"episodes from {replay}" not in log, f"the load ended before the signal: a larger archive\n{log[-2000:]}"
    assert "loading the archive stopped before" in log and elapsed < 4.0, f"{elapsed:.1f} s\n{log[-3000:]}"

def caught_signals(pid: int) -> int:
    """The mask of signals the process has handlers for (Linux /proc), 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    return next(int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from Linux /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_node_signalled_while_it_still_imports_exits_0_without_starting(ros_graph, tiny_checkpoint, sig):
    """A launch shut down within a second of starting signals nodes still importing rclpy and torch; they
    died of the signal (exit -2 / -15), which launch reports as a crash. The entry point's SIGTERM handler,
    the first thing it installs, shows in /proc when the imports begin: the signal is sent then."""
    node = ros_graph.start("policy", checkpoint=str(tiny_checkpoint))
    deadline = time.monotonic() + 30.0
    while not caught_signals(node.proc.pid) & (1 << (signal.SIGTERM - 1)):
        assert node.proc.poll() is None and time.monotonic() < deadline, node.log()[-3000:]
        time.sleep(0.001)
    node.interrupt(sig)
    assert node.proc.wait(15) == 0, f"exit status {node.proc.returncode}\n{node.log()[-3000:]}"
    assert f"policy: {sig.name} before the node started" in node.log(), node.log()[-3000:]


@pytest.mark.parametrize("sig, times", [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGINT, 2)],
                         ids=["SIGTERM", "SIGINT", "SIGINT-twice"])
def test_every_node_exits_0_promptly_on_a_signal_and_the_open_bag_is_finished(ros_graph, tiny_checkpoint, sig,
                                                                               times):
    """Twice: Ctrl-C in a launch's terminal reaches every node, and launch sends its own SIGINT; the second
    one used to kill a node mid-cleanup (exit -2, found by an audit)."""
    probe = ros_graph.probe
    watch(probe)
    archive = ros_graph.dir / "archive"
    start_control(ros_graph, tiny_checkpoint)
    ros_graph.start("adaptation", checkpoint=str(tiny_checkpoint), archive_dir=str(archive),
                    output_dir=str(ros_graph.dir / "adapted"))
    wait_acting(probe)
    probe.wait_for(lambda: list(archive.glob("*/*.mcap")), 30.0, "an episode being recorded")
    wait_collecting(probe, "adaptation")
    assert not finished_bags(archive), "mid-episode: no bag finished yet"
    nodes = list(ros_graph.nodes.values())
    started = time.monotonic()
    for _ in range(times):
        for node in nodes:  # all at once, as a launch file's shutdown does
            node.interrupt(sig)
        time.sleep(0.03)
    for node in nodes:
        assert node.proc.wait(15) == 0, f"{node.name} exit status {node.proc.returncode}\n{node.log()[-3000:]}"
    elapsed = time.monotonic() - started
    assert elapsed < 10.0, f"the nodes took {elapsed:.1f} s to exit"
    (bag,) = finished_bags(archive)
    episodes, report = read_bag(bag, ROBOT)
    assert not report.problems and len(episodes) == 1 and len(episodes[0]) > 10
