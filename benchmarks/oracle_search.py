"""Speed of the oracle's search: scoring one round of its schedules through mujoco.rollout (what
ArmReachFamily.oracle_schedule does) against stepping the env through them one episode at a time (what it did
before, and what every policy's evaluation does), measured in the same run, rounds alternating so machine load
hits both alike. Every round also checks that both give the same returns, bit for bit.

A round is what the search simulates 60 times per task: 32 schedules around the held oracle command (std 0.5,
as the search's first round), on the first held-out arm_reach task.

    .venv/bin/python benchmarks/oracle_search.py [--rounds 10] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mql_ros.sim.families import (  # noqa: E402
    ORACLE_SWITCHES,
    ArmReachFamily,
    _schedule_return,
    _schedule_returns,
)

POPULATION = 32  # schedules per round of the search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 4 schedules: a smoke run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rounds, population_size = (2, 4) if args.quick else (args.rounds, POPULATION)
    if rounds < 1:
        ap.error(f"--rounds must be >= 1, got {rounds}")

    family = ArmReachFamily()
    task = family.test_tasks()[0]
    env = family.make_env(task)
    held = family.oracle_command(task)
    lower, upper = env.robot.command_lower[:-1], env.robot.command_upper[:-1]
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"stepped": [], "rollout": []}
    for _ in range(rounds):
        population = np.clip(held + 0.5 * rng.standard_normal((population_size, len(ORACLE_SWITCHES) + 1, held.size)),
                             lower, upper)
        start = time.perf_counter()
        stepped = [_schedule_return(env, schedule, 0) for schedule in population]
        times["stepped"].append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = _schedule_returns(env, population, 0)
        times["rollout"].append(time.perf_counter() - start)
        if batched.tolist() != stepped:
            sys.exit(f"the rollout's returns differ from the env's: {batched.tolist()} against {stepped}")

    median = {k: float(np.median(v)) for k, v in times.items()}
    ratio = median["stepped"] / median["rollout"]
    print(f"oracle search, {family.name} test task 0: {rounds} rounds of {population_size} schedules x "
          f"{env.episode_steps} steps, {os.cpu_count()} cores; returns identical in every round")
    print(f"{'':<10}{'s / round':>12}{'episodes / s':>14}")
    for name, seconds in median.items():
        print(f"{name:<10}{seconds:12.3f}{population_size / seconds:14.1f}")
    print(f"rollout is {ratio:.2f}x the stepped env")
    if args.json:
        print(json.dumps({"rounds": rounds, "population": population_size, "cores": os.cpu_count(),
                          "seconds_per_round": median, "speedup": ratio}))


if __name__ == "__main__":
    main()
