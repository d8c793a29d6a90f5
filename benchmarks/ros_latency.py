"""joint_state -> command latency and tick timing of the policy node, across real processes over DDS.

Two runs of the real `policy` executable, both at 100 Hz, fed by this process (which plays a 100 Hz robot
driver publishing /joint_states, /gripper/joint_states and /mql/context):
  * trigger=state: the node acts on each arm state. Latency = command received here - state published
    here, one monotonic clock, so it is the full round trip through DDS, decoding, the actor and back.
  * trigger=timer (the default: the policy is the clock): commands at control_rate. A tick is on time when
    its command arrives within `--tolerance-ms` of its slot on the ideal 100 Hz grid (the grid's phase is
    fitted as the median offset); a missed tick counts as late.
Baselines, measured in the same run: the same round trip through a minimal rclpy echo process (state in,
Float64MultiArray out, no policy) spun like the nodes (mql_ros.nodes.common.main_for), once with rclpy's
wait-set SingleThreadedExecutor and once with the EventsExecutor the policy node uses, so the ratio against
the latter shows what the node adds over rclpy itself. `--policy-priority` runs the policy node and both
echoes under SCHED_FIFO (the node's realtime_priority parameter).
Targets: p99 latency <= 2 ms, >= 99% of ticks on time. Prints numbers; asserts nothing.

    python benchmarks/ros_latency.py [--seconds 10] [--rate 100] [--checkpoint CKPT]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "test"))  # the process helpers of the integration tests

from rosgraph_helpers import BENCHMARK_DOMAINS, NodeProcess, Probe, claim_domain, ros_env  # noqa: E402

ECHO = """
import sys
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray
from mql_ros.nodes.common import RELIABLE_QOS, SENSOR_QOS, main_for, set_realtime_priority
executor, priority = sys.argv[1], int(sys.argv[2])

def make():
    node = Node("echo")
    pub = node.create_publisher(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    node.create_subscription(JointState, "joint_states", lambda m: pub.publish(Float64MultiArray(
        data=list(m.position))), SENSOR_QOS)
    print(set_realtime_priority(priority), flush=True)
    return node

sys.exit(main_for(make, None, SingleThreadedExecutor) if executor == "wait-set" else main_for(make))
"""


def make_checkpoint(path: Path) -> Path:
    """An untrained checkpoint of the default network size (latency does not depend on training)."""
    import torch

    from mql_ros.core.checkpoint import save_checkpoint
    from mql_ros.core.config import load_config
    from mql_ros.core.robot import RobotSpec
    from mql_ros.core.td3 import TD3Context

    torch.set_num_threads(1)
    robot = RobotSpec.from_urdf()
    agent = TD3Context(load_config(), robot.obs_dim, robot.act_dim, seed=0)
    save_checkpoint(path, agent, "arm_reach", robot)
    return path


class Driver:
    """A fake robot driver in this process; remembers when each state was published, keyed by the command
    that must answer it (the echo's copy of the state, or the deterministic actor's output for it)."""

    def __init__(self, probe: Probe, context_dim: int, answer):
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float32MultiArray

        from mql_ros.core.robot import RobotSpec
        from mql_ros.nodes.common import RELIABLE_QOS

        self.robot = RobotSpec.from_urdf()
        node = probe.node
        self.JointState = JointState
        self.arm = node.create_publisher(JointState, "joint_states", 10)
        self.grip = node.create_publisher(JointState, "gripper/joint_states", 10)
        self.ctx = node.create_publisher(Float32MultiArray, "mql/context", RELIABLE_QOS)
        self.ctx_msg = Float32MultiArray(data=[0.0] * context_dim)
        self.answer = answer
        self.sent: dict[tuple, float] = {}

    def publish(self, k: int) -> None:
        q = [-1.0 + 2.0 * ((k * 0.6180339887) % 1.0), 0.1, -0.1, 0.2]  # distinct for every k
        self.grip.publish(self.JointState(name=list(self.robot.gripper_joints), position=[0.01, 0.01],
                                          velocity=[0.0, 0.0]))
        self.ctx.publish(self.ctx_msg)
        key = self.answer(np.array(q))
        arm = self.JointState(name=list(self.robot.arm_joints), position=q, velocity=[0.0] * 4)
        self.sent[key] = time.monotonic()
        self.arm.publish(arm)


def scheduling(priority: int) -> str:
    """How the benchmarked nodes are scheduled (the policy's realtime_priority parameter)."""
    return f"SCHED_FIFO {priority}" if priority else "normal scheduling"


def key_of(values) -> tuple:
    return tuple(np.round(np.asarray(values, dtype=np.float64), 9))


def run_driver(driver: Driver, rate: float, seconds: float, k0: int) -> int:
    period = 1.0 / rate
    start = time.monotonic()
    k = 0
    while True:
        slot = start + k * period
        if slot >= start + seconds:
            return k0 + k
        delay = slot - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        driver.publish(k0 + k)
        k += 1


def latencies(probe: Probe, driver: Driver, since: float) -> np.ndarray:
    """Round-trip times (s) of the commands that answer a state published after `since`."""
    out = []
    for t_recv, msg in probe.stamped("arm_controller/commands"):
        sent = driver.sent.get(key_of(msg.data))
        if sent is not None and sent >= since:
            out.append(t_recv - sent)
    return np.array(out)


def report(name: str, lat: np.ndarray, expected: int) -> dict:
    ms = lat * 1e3
    row = {"n": len(ms), "median_ms": float(np.median(ms)) if len(ms) else float("nan"),
           "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan")}
    print(f"  {name:24s} answered {row['n']}/{expected} states  median {row['median_ms']:.3f} ms  "
          f"p99 {row['p99_ms']:.3f} ms  max {ms.max() if len(ms) else float('nan'):.3f} ms")
    return row


def timer_on_time(stamps: np.ndarray, rate: float, tol: float) -> tuple[float, float, int]:
    """(fraction of grid slots answered within tol, achieved rate, slots) for commands of a timer node."""
    period = 1.0 / rate
    k = np.round((stamps - stamps[0]) / period).astype(int)
    phase = np.median(stamps - k * period)
    slots = k[-1] + 1
    on_time_slots = {int(s) for s, t in zip(k, stamps, strict=True) if abs(t - (phase + s * period)) <= tol}
    achieved = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    return len(on_time_slots) / slots, achieved, slots


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--tolerance-ms", type=float, default=2.0)
    ap.add_argument("--checkpoint", default="", help="default: an untrained checkpoint of the default size")
    ap.add_argument("--policy-priority", type=int, default=0,
                    help="SCHED_FIFO priority of the policy node and the echoes (0: normal scheduling)")
    args = ap.parse_args()
    os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
    from std_msgs.msg import Float64MultiArray

    from mql_ros.core.runtime import DeployedPolicy
    from mql_ros.nodes.common import RELIABLE_QOS

    work = Path(tempfile.mkdtemp(prefix="mql_ros_latency_"))
    ckpt = Path(args.checkpoint) if args.checkpoint else make_checkpoint(work / "bench.pt")
    context_dim = DeployedPolicy.from_checkpoint(ckpt).context_dim
    expected = int(args.seconds * args.rate)
    domain, _lock = claim_domain(BENCHMARK_DOMAINS, os.getpid())
    print(f"ros_latency: {args.rate:g} Hz for {args.seconds:g} s (+{args.warmup:g} s warm-up), "
          f"checkpoint {ckpt.name}, context_dim {context_dim}, {os.cpu_count()} CPUs, "
          f"{scheduling(args.policy_priority)}")
    results = {}
    policy = DeployedPolicy.from_checkpoint(ckpt)
    robot = policy.checkpoint.robot

    def policy_answer(q: np.ndarray) -> tuple:
        obs = robot.observation(q, np.zeros(4), np.array([0.01, 0.01]), np.zeros(2))
        return key_of(robot.action_to_commands(policy.act(obs, np.zeros(context_dim)))[0])

    for name in ("echo, wait-set executor", "echo, events executor", "policy trigger=state",
                 "policy trigger=timer"):
        probe = Probe(domain)
        echo = node = None
        try:
            probe.subscribe(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
            if name.startswith("echo"):
                script = work / "echo.py"
                script.write_text(ECHO)
                env = {**ros_env(domain), "PYTHONPATH": str(ROOT)}  # the echo imports mql_ros's QoS
                echo = subprocess.Popen([sys.executable, str(script), name.split(", ")[1].split()[0],
                                         str(args.policy_priority)], env=env, cwd=work, start_new_session=True)
                driver = Driver(probe, context_dim, key_of)
            else:
                trigger = name.split("=")[1]
                node = NodeProcess("policy", {"checkpoint": str(ckpt), "control_rate": args.rate,
                                              "state_timeout": 0.1, "trigger": trigger,
                                              "realtime_priority": args.policy_priority}, domain, work,
                                   name=f"policy_{trigger}")
                driver = Driver(probe, context_dim, policy_answer)
            k = 0
            deadline = time.monotonic() + 60
            while not probe.received("arm_controller/commands") and time.monotonic() < deadline:
                k = run_driver(driver, args.rate, 0.1, k)
            if not probe.received("arm_controller/commands"):
                print(f"  {name}: no commands within 60 s" + (f"\n{node.log()[-2000:]}" if node else ""))
                continue
            k = run_driver(driver, args.rate, args.warmup, k)
            since = time.monotonic()
            run_driver(driver, args.rate, args.seconds, k)
            time.sleep(0.2)
            if "timer" not in name:
                results[name] = report(name, latencies(probe, driver, since), expected)
            else:
                stamps = np.array([t for t, _ in probe.stamped("arm_controller/commands") if t >= since])
                stamps = stamps[stamps <= since + args.seconds]
                frac, achieved, slots = timer_on_time(stamps, args.rate, args.tolerance_ms * 1e-3)
                gaps = np.diff(stamps) * 1e3
                print(f"  {name:24s} {len(stamps)} commands in {slots} slots, achieved {achieved:.2f} Hz, "
                      f"on time (+-{args.tolerance_ms:g} ms) {100 * frac:.2f}%, interval p1/p50/p99 "
                      f"{np.percentile(gaps, 1):.2f}/{np.median(gaps):.2f}/{np.percentile(gaps, 99):.2f} ms")
                results[name] = {"on_time": frac, "achieved_hz": achieved}
        finally:
            probe.close()
            if node is not None:
                node.stop()
            if echo is not None:
                echo.send_signal(signal.SIGINT)
                echo.wait(10)
    base, state = results.get("echo, events executor"), results.get("policy trigger=state")
    if base and state:
        print(f"ratio policy/echo (same executor): median {state['median_ms'] / base['median_ms']:.2f}x, "
              f"p99 {state['p99_ms'] / base['p99_ms']:.2f}x")
        print(f"target p99 <= 2 ms: {'met' if state['p99_ms'] <= 2.0 else 'NOT met'} "
              f"({state['p99_ms']:.3f} ms)")
    timer = results.get("policy trigger=timer")
    if timer:
        print(f"target >= 99% of ticks on time: {'met' if timer['on_time'] >= 0.99 else 'NOT met'} "
              f"({100 * timer['on_time']:.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
