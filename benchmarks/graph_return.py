"""Return on the live ROS graph vs the same checkpoint, tasks and initial states without ROS.

The graph is sim_arm -> context_encoder -> policy, as real processes over DDS.

Graph: the real `sim_arm`, `context_encoder` and `policy` executables, each its own process, on a ROS domain
of their own (one of 91..101, held by a lock file like the tests' domains), all at the family env's control rate
(25 Hz for the arm families). For each of the first `--tasks` tasks of `--split` this process sets the sim's
`task_index` parameter, calls /sim/reset (the task takes effect at the next episode), and measures the next
`--episodes` complete episodes: the return of an episode is the sum of the /mql/reward messages the sim
published between that episode's /mql/episode start and end events (DDS source timestamps, i.e. the sim's
own publication order, so this process's delivery order does not matter). That is one graph run; there are
`--repeats` of them, each with fresh node processes (so a fresh phase between the sim's and the policy's
timers, see below) and sim seed `--seed` + 1000 R.

Baselines, in the same run, after the graph has stopped, paired episode by episode: the sim resets episode E
with its seed + E, and each baseline rollout of that episode's task is given the same seed, so it starts from
the same initial state. All use mql_ros.core.training.rollout (the training / `mql-ros eval` path) with the
checkpoint's deployed policy (what the nodes run):
  ROS-free   rollout as it is: the context of command k holds the entries of steps 0..k-1, as in training;
  limited    behind the policy node's own CommandGuard (mql_ros.core.safety): each command within
             `--max-arm-step` / `--max-gripper-step` of the previous one, the first command of an episode
             limited from the graph's last command before it, since the running guard keeps it across
             episodes. The shipped checkpoint's commands swing further than 0.5 rad on most steps, so the
             limit alone costs return: "graph - limited" is what the graph's timing costs beyond it.
Before 2026-12-04 the graph lost two more things, which this benchmark found: the encoder published step k's
context only when command k+1 arrived (one step late), and it dropped every episode's step 0 (a wait-set
executor handed it the first state before the start event). Modelled without ROS they cost about 1.8 and 2.1
of return (the graph returned -6.04 where ROS-free gave -2.38 and the limited baseline -3.88).
The difference graph - baseline is given per task and as a mean with a 90% bootstrap interval (tasks
resampled, then episodes within each task) and the standard error over tasks.

The graph is not step-synchronous, so some difference from even the limited baseline is expected:
sim and policy run their own timers at the same rate with an arbitrary phase, fixed when the nodes start
("phase": how long after the sim's latest tick the policy publishes; a command published just before the
next tick can arrive after it, and is then applied a tick late), a sim tick can apply no new command or skip
one ("cmds/tick" counts the policy's commands between consecutive sim ticks: 0 and 2+ are such slips), the
first command of an episode can still come from the previous episode's last state or context, and on a
loaded machine the policy holds (stale state or context) or misses ticks. Holds are counted twice: the
policy's /diagnostics `held_ticks` over the measured windows, and per episode as arm commands equal to a
position the sim measured (a hold commands exactly the last measured positions; a computed command
practically never does). Missed ticks: slots of the ideal control-rate grid without a command within
`--tolerance-ms` (the commands' DDS source timestamps; the rule of benchmarks/ros_latency.py). The load
average and each node's CPU share are printed, since on this 2-core machine other jobs shift the timing.
Prints numbers; asserts nothing.

    python benchmarks/graph_return.py [--checkpoint checkpoints/arm_reach.pt] [--family arm_reach]
        [--split test] [--tasks 5] [--episodes 2] [--repeats 2] [--seed 0] [--max-arm-step 0.5]
        [--trigger timer|state] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "test"))  # the process helpers of the integration tests
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ros_latency import timer_on_time  # noqa: E402
from rosgraph_helpers import (  # noqa: E402
    BENCHMARK_DOMAINS,
    NodeProcess,
    Probe,
    claim_domain,
    diagnostic_values,
    wait_control_loop_connected,
)
from soak import cpu_seconds  # noqa: E402

NODES = ("sim_arm", "context_encoder", "policy")
class _Seeds:
    """Stands in for rollout's rng: hands out the given reset seeds in order (the policy is deterministic, so
    rollout draws nothing else)."""

    def __init__(self, seeds: list[int]) -> None:
        self._it = iter(seeds)

    def integers(self, *args, **kwargs) -> int:
        return next(self._it)


class _RateLimitedPolicy:
    """The deployed policy behind the policy node's own CommandGuard (mql_ros.core.safety): each command rate
    limited from the previous one (max_arm_step / max_gripper_step) and clamped to the joint limits; the action
    returned (and pushed into the context, as the encoder reads the published command) is the limited one. The
    running guard keeps its previous command across episodes, so an episode's first command is limited from
    the last command of the episode before: `refs` holds that reference (arm + gripper command) for each coming
    episode, None for the measured positions (the guard's first command ever)."""

    def __init__(self, policy, max_arm_step: float, max_gripper_step: float) -> None:
        from mql_ros.core.safety import CommandGuard, SafetyLimits

        self.policy = policy
        self.robot = policy.checkpoint.robot
        self.guard = CommandGuard(self.robot, SafetyLimits(1.0, 1.0, max_arm_step, max_gripper_step))
        self.refs: list[np.ndarray | None] = []
        self.steps = self.bound = 0  # commands, and those the limit changed

    def new_context(self):
        ref = self.refs.pop(0) if self.refs else None
        self.guard.reset(ref)  # the running node's guard holds the last command of the episode before
        return self.policy.new_context()

    def act(self, obs, context):
        arm_q, arm_dq, grip_q, grip_dq = self.robot.split_observation(obs)
        self.guard.set_joint_state("arm", self.robot.arm_joints, arm_q, arm_dq, now=0.0)
        self.guard.set_joint_state("gripper", self.robot.gripper_joints, grip_q, grip_dq, now=0.0)
        self.guard.set_context(context, self.policy.context_dim, now=0.0)
        command = self.guard.command(0.0, self.policy)
        if command.hold:
            raise RuntimeError(f"the guard held on a ROS-free step: {command.hold}")
        unlimited = np.concatenate(self.robot.action_to_commands(self.policy.act(obs, context)))
        out = np.concatenate([command.arm, command.gripper])
        self.steps += 1
        self.bound += bool(np.any(np.abs(out - unlimited) > 1e-12))
        n = self.robot.n_arm
        return self.robot.commands_to_action(out[:n], out[n:]).astype(np.float32)


def ros_free_returns(policy, family, task: dict, name: str, seeds: list[int]) -> list[float]:
    from mql_ros.core.tasks import make_checked_env
    from mql_ros.core.training import rollout

    env = make_checked_env(family, task, name)
    return [e.total_reward for e in rollout(env, policy, episodes=len(seeds), rng=_Seeds(seeds),
                                                     task_id=name)]


def bootstrap_mean(cells: list[np.ndarray], rng: np.random.Generator, reps: int = 4000) -> tuple[float, float]:
    """90% interval of the mean over tasks of each task's mean, tasks resampled, then episodes within each."""
    means = np.empty(reps)
    for r in range(reps):
        picks = rng.integers(len(cells), size=len(cells))
        means[r] = np.mean([rng.choice(cells[i], size=len(cells[i])).mean() for i in picks])
    lo, hi = np.percentile(means, [5, 95])
    return float(lo), float(hi)


def set_task_index(probe: Probe, index: int) -> None:
    from rcl_interfaces.msg import Parameter as ParameterMsg
    from rcl_interfaces.msg import ParameterType, ParameterValue
    from rcl_interfaces.srv import SetParameters

    request = SetParameters.Request(parameters=[ParameterMsg(
        name="task_index", value=ParameterValue(type=ParameterType.PARAMETER_INTEGER, integer_value=index))])
    result = probe.call(SetParameters, "sim_arm/set_parameters", request, timeout=60.0).results[0]
    if not result.successful:
        raise RuntimeError(f"sim_arm refused task_index {index}: {result.reason}")


def episode_events(probe: Probe, since_ns: int) -> list[tuple[int, dict]]:
    """(source ns, event) of the /mql/episode events the sim published after `since_ns`."""
    msgs = probe.received("mql/episode")
    stamps = probe.published_ns("mql/episode")
    return [(t, json.loads(m.data)) for t, m in zip(stamps, msgs, strict=False) if t > since_ns]


def complete_episodes(events: list[tuple[int, dict]], tid: str) -> list[tuple[int, int, int]]:
    """(episode number, start ns, end ns) of each episode of task `tid` with both events, in order."""
    starts = {e["episode"]: t for t, e in events if e["event"] == "start" and e["task_id"] == tid}
    ends = {e["episode"]: t for t, e in events if e["event"] == "end" and e["task_id"] == tid}
    return sorted((n, starts[n], ends[n]) for n in starts if n in ends and ends[n] > starts[n])


def main() -> int:
    # SIGTERM (a `kill` of this benchmark) ends it through the finally blocks that stop the node processes; by
    # default it would leave them running, and loading the machine for whatever is measured next.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "arm_reach.pt"))
    ap.add_argument("--family", default="arm_reach", help="an arm family (sim_arm needs an ArmEnv)")
    ap.add_argument("--split", default="test", choices=("train", "test", "ood"))
    ap.add_argument("--tasks", type=int, default=5, help="the first N tasks of the split")
    ap.add_argument("--episodes", type=int, default=2, help="measured episodes per task (graph and ROS-free)")
    ap.add_argument("--seed", type=int, default=0, help="sim_arm's seed: episode E of graph run R resets with "
                    "seed + 1000 R + E")
    ap.add_argument("--repeats", type=int, default=2, help="graph runs (fresh node processes, so a new phase "
                    "between the sim's and the policy's timers), each measuring --episodes per task")
    ap.add_argument("--tolerance-ms", type=float, default=5.0, help="a command this far off its slot on the "
                    "ideal control-rate grid counts as a missed tick")
    ap.add_argument("--max-arm-step", type=float, default=0.5, help="rad: the policy node's rate limit "
                    "(its max_arm_step parameter, default 0.5), given to the node and used in the 'limited' "
                    "ROS-free columns")
    ap.add_argument("--max-gripper-step", type=float, default=0.035, help="m: the policy's max_gripper_step")
    ap.add_argument("--trigger", default="timer", choices=("timer", "state"), help="the policy's trigger")
    ap.add_argument("--episode-timeout", type=float, default=60.0,
                    help="s to wait for each measured episode before giving up (a loaded machine is slow)")
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = ap.parse_args()
    if min(args.tasks, args.episodes, args.repeats) < 1:
        ap.error("--tasks, --episodes and --repeats must be >= 1")
    os.environ.setdefault("AMENT_PREFIX_PATH", sys.prefix)
    from mql_ros.core.runtime import DeployedPolicy
    from mql_ros.core.tasks import resolve_family, split_tasks, task_id

    family = resolve_family(args.family)
    tasks = split_tasks(family, args.split)
    if args.tasks > len(tasks):
        ap.error(f"--tasks {args.tasks}: the {args.split} split of {family.name} has {len(tasks)} tasks")
    tasks = tasks[: args.tasks]
    env = family.make_env(tasks[0])
    rate, steps = 1.0 / env.control_dt, env.episode_steps
    ckpt = str(Path(args.checkpoint).resolve())
    policy = DeployedPolicy.from_checkpoint(ckpt)
    domain, _lock = claim_domain(BENCHMARK_DOMAINS, os.getpid())
    work = Path(tempfile.mkdtemp(prefix="mql_ros_graph_return_"))
    load0 = os.getloadavg()
    print(f"graph_return: {family.name}/{args.split}, {args.tasks} tasks x {args.episodes} episodes x "
          f"{args.repeats} graph runs, policy trigger {args.trigger}, max_arm_step {args.max_arm_step:g}, "
          f"episodes of {steps} "
          f"steps at {rate:g} Hz, checkpoint {Path(ckpt).name} ({policy.sha256[:12]}), domain {domain}, "
          f"{os.cpu_count()} CPUs, load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, work dir {work}")

    runs = []
    for r in range(args.repeats):
        try:
            run = graph_run(args, r, family, rate, steps, ckpt, domain, work)
        except (AssertionError, RuntimeError) as exc:
            print(f"graph_return: graph run {r} failed: {exc}")
            return 1
        runs.append(run)
        st = run["stats"]
        print(f"run {r}: graph mean {np.mean([e['graph'] for t in run['tasks'] for e in t]):.2f}; command phase "
              f"{st['phase_ms'][1]:.1f} ms after the sim tick (p5 {st['phase_ms'][0]:.1f}, p95 "
              f"{st['phase_ms'][2]:.1f}); held {st['held_ticks']} of {st['ticks']} ticks; missed "
              f"{100 * st['missed_fraction']:.2f}%; sim {st['sim_hz']:.2f} Hz; load {st['load_average'][0]:.2f}")

    rng = np.random.default_rng(0)
    limited = _RateLimitedPolicy(policy, args.max_arm_step, args.max_gripper_step)
    baselines = {"ros_free": policy, "limited": limited}
    rows = []
    cells: dict[str, list[np.ndarray]] = {k: [] for k in ("graph", *baselines)}
    for i in range(args.tasks):
        tid = task_id(family, args.split, i)
        eps = [e for run in runs for e in run["tasks"][i]]
        seeds = [e["seed"] for e in eps]
        row = {"task_id": tid, "seeds": seeds, "rewards_per_episode": [e["rewards"] for e in eps],
               "held_commands": sum(e["held"] for e in eps), "per_episode": {"graph": [e["graph"] for e in eps]}}
        for key, agent in baselines.items():
            limited.refs = [e["ref"] for e in eps]
            row["per_episode"][key] = ros_free_returns(agent, family, tasks[i], tid, seeds)
        for key, values in row["per_episode"].items():
            cells[key].append(np.array(values))
            row[key] = float(np.mean(values))
        row["diff"] = row["graph"] - row["ros_free"]
        rows.append(row)
    cells["diff"] = [g - f for g, f in zip(cells["graph"], cells["ros_free"], strict=True)]

    columns = (("graph", "graph"), ("ros_free", "ROS-free"), ("diff", "diff"), ("limited", "limited"))
    print(f"\n{'task':<20}{'eps':>4}" + "".join(f"{h:>10}" for _, h in columns) + f"{'sd(diff)':>9}{'held':>6}")
    for row, d in zip(rows, cells["diff"], strict=True):
        sd = f"{d.std(ddof=1):.2f}" if len(d) > 1 else "-"
        flag = "" if all(c == steps for c in row["rewards_per_episode"]) else " *"
        print(f"{row['task_id']:<20}{len(d):>4}" + "".join(f"{row[k]:>10.2f}" for k, _ in columns)
              + f"{sd:>9}{row['held_commands']:>6}{flag}")
    mean = {k: float(np.mean([c.mean() for c in v])) for k, v in cells.items()}
    print(f"{'mean':<20}{'':>4}" + "".join(f"{mean[k]:>10.2f}" for k, _ in columns))
    intervals = {}
    for name, a, b in (("graph - ROS-free", "graph", "ros_free"), ("graph - limited", "graph", "limited"),
                       ("limited - ROS-free", "limited", "ros_free")):
        d = [x - y for x, y in zip(cells[a], cells[b], strict=True)]
        task_d = np.array([x.mean() for x in d])
        se = float(task_d.std(ddof=1) / np.sqrt(len(task_d))) if len(task_d) > 1 else float("nan")
        lo, hi = bootstrap_mean(d, rng)
        intervals[name] = {"mean": float(task_d.mean()), "ci90": [lo, hi], "se_over_tasks": se}
        print(f"{name:<26}{task_d.mean():+8.3f}  90% bootstrap [{lo:+.3f}, {hi:+.3f}]  s.e. over tasks {se:.3f}")
    print(f"(limited: with the policy node's rate limit, max_arm_step "
          f"{args.max_arm_step:g}, from the graph's last command before each episode; it changed "
          f"{100 * limited.bound / max(limited.steps, 1):.0f}% of the limited ROS-free commands)")
    short = sum(c != steps for row in rows for c in row["rewards_per_episode"])
    if short:
        print(f"* {short} episode(s) with other than {steps} rewards received: a return there is not comparable")

    stats = [run["stats"] for run in runs]
    slips = np.sum([st["slips"] for st in stats], axis=0)
    total = max(int(slips.sum()), 1)
    held, ticks = sum(st["held_ticks"] for st in stats), sum(st["ticks"] for st in stats)
    missed = float(np.mean([st["missed_fraction"] for st in stats]))
    print(f"\npolicy: {sum(st['commands'] for st in stats)} commands in {sum(st['seconds'] for st in stats):.1f} s "
          f"measured; missed or late (+-{args.tolerance_ms:g} ms) {100 * missed:.2f}% "
          f"of slots; held ticks (/diagnostics, windows + up to 1 s) {held} of {ticks}; holds in the measured "
          f"episodes (commands equal to a measured position) {sum(r['held_commands'] for r in rows)}")
    reasons = sum((Counter(st["reasons"]) for st in stats), Counter())
    if reasons:
        print("policy statuses other than running (1 Hz /diagnostics, measured windows): " + "; ".join(
            f"{n}x {m}" for m, n in reasons.most_common(5)))
    print(f"sim: {min(st['sim_hz'] for st in stats):.2f}..{max(st['sim_hz'] for st in stats):.2f} Hz (target "
          f"{rate:g}), tick interval p99 up to {max(st['sim_gap_ms'][1] for st in stats):.1f} ms, max "
          f"{max(st['sim_gap_ms'][2] for st in stats):.1f} ms; sim ticks with 0 / 1 / 2+ policy commands since the "
          f"previous tick: " + " / ".join(f"{100 * x / total:.1f}%" for x in slips) + f" of {total}")
    rejected = sum((Counter(st["encoder_rejected"]) for st in stats), Counter())
    episodes = sum(len(t) for run in runs for t in run["tasks"])
    print(f"context_encoder: rejected over the measured windows ({episodes} measured episodes, plus the reset-cut "
          f"ones): {dict(rejected) or 'none'}; last rejection: {stats[-1]['encoder_last_rejection'] or '-'}")
    cpu = {n: np.mean([st["cpu_share"][n] for st in stats]) for n in NODES}
    load1 = os.getloadavg()
    print("CPU share over the windows: " + ", ".join(f"{n} {100 * c:.0f}%" for n, c in cpu.items())
          + f"; load average {load0[0]:.2f} at start, {load1[0]:.2f} at end; node exit codes "
          f"{[st['exit_codes'] for st in stats]}")
    if args.json:
        print(json.dumps({"family": family.name, "split": args.split, "checkpoint": ckpt, "tasks": rows,
                          "mean": mean, "differences": intervals, "short_episodes": short,
                          "rate_limit_bound_fraction": limited.bound / max(limited.steps, 1),
                          "runs": stats, "load_average": [load0[0], load1[0]]}))
    return 0


def graph_run(args, r: int, family, rate: float, steps: int, ckpt: str, domain: int, work: Path) -> dict:
    """One run of the graph (fresh node processes, sim seed args.seed + 1000 r): every task's measured
    episodes (seed, graph return, rewards received, holds, the rate limit's reference) and the run's timing."""
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64, Float64MultiArray, String
    from std_srvs.srv import Trigger

    from mql_ros.core.tasks import task_id
    from mql_ros.nodes.common import LATCHED_QOS, RELIABLE_QOS

    seed = args.seed + 1000 * r
    nodes: dict[str, NodeProcess] = {}
    probe = Probe(domain, logs=lambda: "\n".join(f"=== {n} (exit {p.proc.poll()}) ===\n{p.log()[-3000:]}"
                                                   for n, p in nodes.items()))
    measured: list[list[tuple[int, int, int]]] = []
    load0 = os.getloadavg()
    try:
        probe.subscribe(Float64, "mql/reward", RELIABLE_QOS)
        probe.subscribe(String, "mql/episode", LATCHED_QOS)
        probe.subscribe(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
        probe.subscribe(Float64MultiArray, "gripper_controller/commands", RELIABLE_QOS)
        probe.subscribe(JointState, "joint_states", 10)  # reliable, as the sim writes: every measured position
        probe.subscribe(DiagnosticArray, "/diagnostics", 10)
        params = {"sim_arm": {"family": args.family, "task_split": args.split, "task_index": 0,
                              "seed": seed, "episode_steps": steps, "sim_rate": rate},
                  "context_encoder": {"checkpoint": ckpt},
                  "policy": {"checkpoint": ckpt, "control_rate": rate, "max_arm_step": args.max_arm_step,
                             "max_gripper_step": args.max_gripper_step, "trigger": args.trigger}}
        for name in NODES:
            nodes[name] = NodeProcess(name, params[name], domain, work, name=f"{name}_{r}")
        wait_control_loop_connected(probe, timeout=120.0)
        # the counters' start: statuses come at 1 Hz, so the loop can be connected before the first arrives
        probe.wait_for(lambda: diagnostic_values(probe, "policy") and diagnostic_values(probe, "context_encoder"),
                       10.0, "the first policy and encoder statuses")
        status0 = diagnostic_values(probe, "policy")[-1:]
        enc0 = diagnostic_values(probe, "context_encoder")[-1:]
        n_status0 = len(diagnostic_values(probe, "policy"))
        cpu0 = {n: cpu_seconds(p.proc.pid) for n, p in nodes.items()}
        since, since_ns = time.monotonic(), time.time_ns()
        for i in range(args.tasks):
            tid = task_id(family, args.split, i)
            set_task_index(probe, i)
            switched_ns = time.time_ns()
            if not probe.call(Trigger, "sim/reset", Trigger.Request(), timeout=60.0).success:
                raise RuntimeError("sim/reset refused")
            probe.wait_for(lambda tid=tid, t=switched_ns: len(complete_episodes(episode_events(probe, t), tid))
                           >= args.episodes, args.episode_timeout * args.episodes,
                           f"{args.episodes} complete episodes of {tid}")
            measured.append(complete_episodes(episode_events(probe, switched_ns), tid)[: args.episodes])
        until, until_ns = time.monotonic(), time.time_ns()
        cpu = {n: cpu_seconds(p.proc.pid) - cpu0[n] for n, p in nodes.items()}
        n_diag = len(diagnostic_values(probe, "policy"))
        probe.wait_for(lambda: len(diagnostic_values(probe, "policy")) > n_diag, 10.0, "the policy's next status")
        status1 = diagnostic_values(probe, "policy")[-1:]
        enc1 = diagnostic_values(probe, "context_encoder")[-1:]
        statuses = diagnostic_values(probe, "policy")[n_status0:]
    finally:
        exits = {n: p.stop() for n, p in nodes.items()}
        probe.close()

    rewards = np.array([m.data for m in probe.received("mql/reward")])
    reward_ns = np.array(probe.published_ns("mql/reward"))[: len(rewards)]
    cmds = probe.received("arm_controller/commands")
    cmd_ns = np.array(probe.published_ns("arm_controller/commands"))[: len(cmds)]
    measured_pos = {tuple(m.position) for m in probe.received("joint_states")}
    is_hold = np.array([tuple(m.data) in measured_pos for m in cmds], dtype=bool)
    grips = probe.received("gripper_controller/commands")
    grip_ns = np.array(probe.published_ns("gripper_controller/commands"))[: len(grips)]

    def previous_command(t_ns: int) -> np.ndarray | None:
        """The policy's last arm + gripper command published before t_ns (the guard's rate-limit reference)."""
        i, j = np.searchsorted(cmd_ns, t_ns) - 1, np.searchsorted(grip_ns, t_ns) - 1
        return np.array([*cmds[i].data, grips[j].data[0]]) if i >= 0 and j >= 0 else None

    tasks_out = []
    slips = np.zeros(3, dtype=int)  # sim ticks with 0, 1, 2+ commands since the previous tick
    for episodes in measured:
        out = []
        for n, t0, t1 in episodes:
            inside = (reward_ns > t0) & (reward_ns < t1)
            ticks = np.concatenate([[t0], reward_ns[inside]])
            per_tick = np.histogram(cmd_ns, bins=ticks)[0] if len(ticks) > 1 else np.zeros(0, dtype=int)
            slips += [int((per_tick == 0).sum()), int((per_tick == 1).sum()), int((per_tick >= 2).sum())]
            out.append({"seed": seed + n, "graph": float(rewards[inside].sum()), "rewards": int(inside.sum()),
                        "held": int(is_hold[(cmd_ns > t0) & (cmd_ns < t1)].sum()), "ref": previous_command(t0)})
        tasks_out.append(out)

    window = (cmd_ns >= since_ns) & (cmd_ns <= until_ns)
    frac, achieved, slots = timer_on_time((cmd_ns[window] - since_ns) * 1e-9, rate, args.tolerance_ms * 1e-3)
    ticks = held = -1
    if status0 and status1:
        ticks = int(status1[0].get("ticks", 0)) - int(status0[0].get("ticks", 0))
        held = int(status1[0].get("held_ticks", 0)) - int(status0[0].get("held_ticks", 0))
    enc_rejected = {k[len("rejected_"):]: int(v) - int(enc0[0].get(k, 0)) for k, v in enc1[0].items()
                    if k.startswith("rejected_")} if enc0 and enc1 else {}
    sim_gaps = np.diff(reward_ns[(reward_ns >= since_ns) & (reward_ns <= until_ns)]) * 1e-6
    cmd_w = cmd_ns[window]
    last_tick = np.searchsorted(reward_ns, cmd_w, side="right") - 1
    phase = (cmd_w[last_tick >= 0] - reward_ns[last_tick[last_tick >= 0]]) * 1e-6
    seconds = until - since
    stats = {"seed": seed, "seconds": seconds, "commands": int(window.sum()), "achieved_hz": achieved,
             "slots": int(slots), "missed_fraction": 1 - frac, "held_ticks": held, "ticks": ticks,
             "reasons": dict(Counter(d["_message"] for d in statuses if d["_message"] != "running")),
             "phase_ms": [float(x) for x in np.percentile(phase, [5, 50, 95])],
             "sim_hz": 1e3 / sim_gaps.mean(), "sim_gap_ms": [float(x) for x in (np.median(sim_gaps),
                                                                               np.percentile(sim_gaps, 99),
                                                                               sim_gaps.max())],
             "slips": slips.tolist(), "encoder_rejected": enc_rejected,
             "encoder_last_rejection": enc1[0].get("last_rejection", "") if enc1 else "",
             "cpu_share": {n: c / seconds for n, c in cpu.items()},
             "load_average": [load0[0], os.getloadavg()[0]], "exit_codes": exits}
    return {"tasks": tasks_out, "stats": stats}


if __name__ == "__main__":
    sys.exit(main())
