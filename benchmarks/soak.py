"""Soak: joint states at 1 kHz through the full node graph for a minute (or ten), as real processes over DDS.

The graph: `context_encoder`, `policy` (timer mode, the control clock) and `adaptation` (recording every
contract topic into a rosbag2 archive), each its own process, fed by this process playing the robot
driver: /joint_states and /gripper/joint_states at `--state-rate` (1 kHz), /mql/reward once per control
period, and /mql/episode start/end events every `--episode-seconds` (the adaptation node writes one bag
per episode). The MuJoCo sim is not used: it cannot step at 1 kHz in real time on this machine, and a
synthetic driver gives an exactly known input rate; the nodes see the same message types either way.

Reported, for the measured window after `--warmup`:
  * missed control ticks: slots of the ideal control-rate grid without a command within `--tolerance-ms`
    (same rule as benchmarks/ros_latency.py), on the commands' DDS source timestamps, i.e. when the policy
    published them (the target), and on their arrival in this process (adds DDS delivery and this busy
    process's own scheduling: it also plays the driver); held ticks (published but holding) from the
    policy's /diagnostics; the rate the driver really achieved;
  * context lag: for each /mql/context, its arrival here minus the publication of the latest reward before it
    (the encoder publishes a step's context when the step's reward arrives; both on this process's monotonic
    clock), and contexts per command;
  * resident memory (VmRSS from /proc/PID/status) of each node every `--sample-period`: a least-squares
    slope and the growth it implies over the whole window, and over its second half, which is what "flat"
    is judged on (fitted growth within 3x the residual noise there): the first minutes hold the allocator's
    warm-up (fed in-process without DDS, the adaptation node's RSS rose 0.46 MB over its first 200k states,
    then 8 kB over the next 200k), a leak keeps growing in both halves;
  * archive size per minute (slope of the archive's size on disk, and the final size after the recorder
    closed its bag), the fraction of the window's /joint_states that reached the archive, and CPU time per
    node.
Prints numbers; asserts nothing. Targets: < 1% missed ticks; memory flat (fitted growth within noise).

    python benchmarks/soak.py [--seconds 60] [--ten-minutes] [--state-rate 1000] [--control-rate 100]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "test"))  # the process helpers of the integration tests
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ros_latency import scheduling, timer_on_time  # noqa: E402
from rosgraph_helpers import BENCHMARK_DOMAINS, NodeProcess, Probe, claim_domain, diagnostic_values  # noqa: E402

NODES = ("context_encoder", "policy", "adaptation")
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """Resident set size of a process in kB (VmRSS), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except OSError:
        return float("nan")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def fit(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope per second, residual standard deviation) of a least-squares line."""
    if len(t) < 3:
        return float("nan"), float("nan")
    slope, icpt = np.polyfit(t, y, 1)
    return float(slope), float(np.std(y - (slope * t + icpt)))


class Sampler(threading.Thread):
    """Samples RSS of each node and the archive's size every `period` seconds (its own thread)."""

    def __init__(self, pids: dict[str, int], archive: Path, period: float):
        super().__init__(daemon=True)
        self.pids, self.archive, self.period = pids, archive, period
        self.rows: list[tuple[float, dict[str, int], int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.rows.append((time.monotonic(), {n: rss_kb(p) for n, p in self.pids.items()},
                              dir_bytes(self.archive)))


class Driver:
    """The robot driver: states at state_rate, a reward per control period, episodes every few seconds."""

    def __init__(self, probe: Probe, state_rate: float, control_rate: float, episode_seconds: float):
        from sensor_msgs.msg import JointState
        from std_msgs.msg import Float64, String

        from mql_ros.core.robot import RobotSpec
        from mql_ros.nodes.common import EPISODE, LATCHED_QOS, RELIABLE_QOS, REWARD

        robot = RobotSpec.from_urdf()
        node = probe.node
        self.arm_pub = node.create_publisher(JointState, "joint_states", 10)
        self.grip_pub = node.create_publisher(JointState, "gripper/joint_states", 10)
        self.reward_pub = node.create_publisher(Float64, REWARD, RELIABLE_QOS)
        self.episode_pub = node.create_publisher(String, EPISODE, LATCHED_QOS)
        self.arm = JointState(name=list(robot.arm_joints), velocity=[0.0] * robot.n_arm)
        self.grip = JointState(name=list(robot.gripper_joints), position=[0.01] * len(robot.gripper_joints),
                               velocity=[0.0] * len(robot.gripper_joints))
        self.reward, self.String = Float64(), String
        self.period = 1.0 / state_rate
        self.per_reward = max(1, round(state_rate / control_rate))
        self.per_episode = max(1, round(episode_seconds * state_rate))
        self.episodes = 0
        self.late = 0  # states published more than one period after their slot
        self.reward_times: list[float] = []  # monotonic s of each reward published

    def episode(self, event: str) -> None:
        if event == "start":
            self.episodes += 1
        self.episode_pub.publish(self.String(data=json.dumps(
            {"event": event, "task_id": "soak/0", "task": {"episode": self.episodes}})))

    def run(self, seconds: float, k0: int) -> int:
        start = time.monotonic()
        k = 0
        while True:
            slot = start + k * self.period
            if slot >= start + seconds:
                return k0 + k
            delay = slot - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -self.period:
                self.late += 1
            i = k0 + k
            if i % self.per_episode == 0:
                if i:
                    self.episode("end")
                self.episode("start")
            t = i * self.period
            self.arm.position = [0.3 * np.sin(t + j) for j in range(len(self.arm.name))]
            self.arm_pub.publish(self.arm)
            self.grip_pub.publish(self.grip)
            if i % self.per_reward == 0:
                self.reward.data = -abs(self.arm.position[0])
                self.reward_pub.publish(self.reward)
                self.reward_times.append(time.monotonic())
            k += 1


def context_lag(rewards: list[float], contexts: list[float]) -> np.ndarray:
    """For each context, its arrival minus the publication of the latest reward before it (s)."""
    c = np.asarray(rewards)
    z = np.asarray(contexts)
    i = np.searchsorted(c, z, side="right") - 1
    ok = i >= 0
    return z[ok] - c[i[ok]]


def count_recorded(archive: Path, topic: str, t0_ns: int, t1_ns: int) -> int:
    """Messages of `topic` in the archive's finished bags with a log time in [t0_ns, t1_ns] (system clock)."""
    from rosbags.rosbag2 import Reader

    n = 0
    for bag in sorted(p.parent for p in archive.glob("*/metadata.yaml")):
        with Reader(bag) as reader:
            connections = [c for c in reader.connections if c.topic == topic]
            n += sum(t0_ns <= t <= t1_ns for _, t, _ in reader.messages(connections=connections))
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--ten-minutes", action="store_true", help="--seconds 600 (the README's numbers)")
    ap.add_argument("--state-rate", type=float, default=1000.0)
    ap.add_argument("--control-rate", type=float, default=100.0)
    ap.add_argument("--episode-seconds", type=float, default=5.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--sample-period", type=float, default=1.0)
    ap.add_argument("--tolerance-ms", type=float, default=2.0)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "arm_reach.pt"))
    ap.add_argument("--max-new-transitions", type=int, default=2000,
                    help="the adaptation node's in-memory new-task data cap; reached within the warm-up and "
                         "first episodes, so the window measures its steady state (node default: 100000)")
    ap.add_argument("--policy-priority", type=int, default=0,
                    help="the policy node's realtime_priority (SCHED_FIFO, as a robot's control loop runs; "
                         "0: normal scheduling, like every other process)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.ten_minutes:
        args.seconds = 600.0
    os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
    from diagnostic_msgs.msg import DiagnosticArray
    from std_msgs.msg import Float32MultiArray, Float64MultiArray

    from mql_ros.nodes.common import RELIABLE_QOS

    work = Path(tempfile.mkdtemp(prefix="mql_ros_soak_"))
    archive = work / "archive"
    domain, _lock = claim_domain(BENCHMARK_DOMAINS, os.getpid())
    print(f"soak: states {args.state_rate:g} Hz, control {args.control_rate:g} Hz, {args.seconds:g} s, policy "
          f"{scheduling(args.policy_priority)} "
          f"(+{args.warmup:g} s warm-up), episodes of {args.episode_seconds:g} s, domain {domain}, "
          f"load average {os.getloadavg()[0]:.2f}, work dir {work}")
    probe = Probe(domain)
    nodes: dict[str, NodeProcess] = {}
    try:
        probe.subscribe(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
        probe.subscribe(Float32MultiArray, "mql/context", RELIABLE_QOS)
        probe.subscribe(DiagnosticArray, "/diagnostics", 10)
        ckpt = str(Path(args.checkpoint).resolve())
        params = {"context_encoder": {"checkpoint": ckpt},
                  "policy": {"checkpoint": ckpt, "control_rate": args.control_rate, "trigger": "timer",
                             "realtime_priority": args.policy_priority},
                  "adaptation": {"checkpoint": ckpt, "archive_dir": str(archive), "min_new_transitions": 0,
                                 "max_new_transitions": args.max_new_transitions,
                                 "output_dir": str(work / "adapted")}}
        for name in NODES:
            nodes[name] = NodeProcess(name, params[name], domain, work)
        driver = Driver(probe, args.state_rate, args.control_rate, args.episode_seconds)
        k = 0
        deadline = time.monotonic() + 90
        while not probe.received("mql/context") or not probe.received("arm_controller/commands"):
            if time.monotonic() > deadline or any(n.proc.poll() is not None for n in nodes.values()):
                print("the graph did not come up:\n" + "\n".join(f"--- {n}\n{p.log()[-1500:]}"
                                                                 for n, p in nodes.items()))
                return 1
            k = driver.run(0.1, k)
        k = driver.run(args.warmup, k)
        sampler = Sampler({n: p.proc.pid for n, p in nodes.items()}, archive, args.sample_period)
        cpu0 = {n: cpu_seconds(p.proc.pid) for n, p in nodes.items()}
        held0 = diagnostic_values(probe, "policy")
        driver.late = 0
        # This process keeps every message it receives; a full garbage collection over them stalled the
        # driver for up to 0.7 s (the policy then held on stale state). Nothing here makes cycles.
        gc.disable()
        since, since_ns = time.monotonic(), time.time_ns()
        sampler.start()
        k_start = k
        k = driver.run(args.seconds, k)
        until, until_ns = time.monotonic(), time.time_ns()
        gc.enable()
        sampler.stop.set()
        sampler.join()
        driver.run(1.5, k)  # the last diagnostics (1 Hz) and in-flight messages; the policy keeps fresh state
        cpu = {n: cpu_seconds(p.proc.pid) - cpu0[n] for n, p in nodes.items()}
        held1 = diagnostic_values(probe, "policy")
    finally:
        exits = {n: p.stop() for n, p in nodes.items()}
        probe.close()

    cmd_t = np.array([t for t, _ in probe.stamped("arm_controller/commands") if since <= t <= until])
    cmd_pub = np.array([t for t in probe.published_ns("arm_controller/commands") if since_ns <= t <= until_ns])
    frac_pub, _, _ = timer_on_time((cmd_pub - since_ns) * 1e-9, args.control_rate, args.tolerance_ms * 1e-3)
    ctx_t = np.array([t for t, _ in probe.stamped("mql/context") if since <= t <= until])
    frac, achieved, slots = timer_on_time(cmd_t, args.control_rate, args.tolerance_ms * 1e-3)
    held = (int(held1[-1]["held_ticks"]) - int(held0[-1]["held_ticks"])) if held0 and held1 else -1
    lag = context_lag(driver.reward_times, list(ctx_t)) * 1e3
    states = k - k_start
    print(f"driver: {states} states in {until - since:.1f} s = {states / (until - since):.1f} Hz, "
          f"{driver.late} published > 1 period late; {driver.episodes} episodes")
    print(f"control ticks: {len(cmd_pub)} commands published at {achieved:.2f} Hz, held {held}; missed or late "
          f"(+-{args.tolerance_ms:g} ms) at the policy (DDS source timestamps): {100 * (1 - frac_pub):.2f}% "
          f"(target < 1%); on arrival here: {100 * (1 - frac):.2f}% of {slots} slots")
    reasons = Counter(d["_message"] for d in held1[len(held0):] if d["_message"] != "running")
    if reasons:
        print("policy statuses other than running (1 Hz diagnostics): " + "; ".join(
            f"{n}x {m}" for m, n in reasons.most_common(5)))
    print(f"context lag (context arrival - its reward's publication): median {np.median(lag):.2f} ms, p99 "
          f"{np.percentile(lag, 99):.2f} ms, max {lag.max():.2f} ms; {len(ctx_t)} contexts per "
          f"{len(cmd_t)} commands")
    t = np.array([r[0] for r in sampler.rows]) - since
    res = {"states_hz": states / (until - since), "missed_fraction": 1 - frac_pub,
           "missed_on_arrival_fraction": 1 - frac, "achieved_hz": achieved,
           "held_ticks": held, "context_lag_ms": {"median": float(np.median(lag)),
                                                  "p99": float(np.percentile(lag, 99))},
           "contexts": len(ctx_t), "commands": len(cmd_t), "rss": {}, "cpu_s": cpu, "exit_codes": exits}
    print(f"{'node':<16}{'RSS start MB':>13}{'RSS end MB':>11}{'slope kB/min':>13}{'fit growth kB':>14}"
          f"{'2nd half kB':>12}{'noise kB':>9}{'flat':>6}{'CPU %':>7}")
    late = t >= t[-1] / 2 if len(t) else t
    for name in NODES:
        y = np.array([r[1][name] for r in sampler.rows], dtype=float)
        slope, noise = fit(t, y)
        growth = slope * (t[-1] - t[0]) if len(t) > 1 else float("nan")
        late_slope, late_noise = fit(t[late], y[late])
        late_growth = late_slope * (t[late][-1] - t[late][0]) if late.sum() > 1 else float("nan")
        flat = abs(late_growth) <= max(3 * late_noise, PAGE / 1024)
        res["rss"][name] = {"start_kb": int(y[0]), "end_kb": int(y[-1]), "slope_kb_per_min": slope * 60,
                            "growth_kb": growth, "second_half_growth_kb": late_growth,
                            "noise_kb": late_noise, "flat": bool(flat)}
        print(f"{name:<16}{y[0] / 1024:>13.1f}{y[-1] / 1024:>11.1f}{slope * 60:>13.1f}{growth:>14.1f}"
              f"{late_growth:>12.1f}{late_noise:>9.1f}{'yes' if flat else 'NO':>6}"
              f"{100 * cpu[name] / (until - since):>7.1f}")
    size = np.array([r[2] for r in sampler.rows], dtype=float)
    size_slope, _ = fit(t, size)
    final = dir_bytes(archive)
    res["archive_mb_per_min"] = size_slope * 60 / 1e6
    res["archive_final_mb"] = final / 1e6
    print(f"archive: {size_slope * 60 / 1e6:.2f} MB/min while recording (slope); {final / 1e6:.1f} MB after "
          f"closing, {len(list(archive.glob('*/metadata.yaml')))} bags, for {(until - since) / 60:.2f} min "
          f"measured + warm-up")
    recorded = count_recorded(archive, "/joint_states", since_ns, until_ns)
    res["recorded_states_fraction"] = recorded / states
    print(f"recorded: {recorded} of the {states} /joint_states published in the measured window "
          f"({100 * recorded / states:.2f}%; sensor-data QoS drops what a slow recorder cannot take)")
    print(f"node exit codes: {exits}; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
