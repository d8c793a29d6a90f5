"""Does the actor's pre-activation penalty let TD3 reach precisely with absolute joint-position actions?

The arm's actions are joint position targets scaled to [-1, 1] by a tanh; the best target for a joint
can sit near its limit, where the tanh saturates and its gradient vanishes. This trains plain TD3 (no
context: one task) on one held-out arm_reach target, with and without MQLConfig.actor_preactivation_l2,
same seed and steps, and reports the deterministic policy's return, its distance to the target at the
end of the episode, how often an action component is saturated (|a| > 0.99), and the oracle's return.

    python benchmarks/preactivation.py [--steps 15000] [--l2 0.01] [--task 0] [--seed 0]   # ~5 min
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import torch

from mql_ros.core.config import load_config
from mql_ros.core.paths import share_file
from mql_ros.core.tasks import make_checked_env
from mql_ros.core.training import meta_train, rollout
from mql_ros.sim.families import ArmReachFamily


class OneTarget(ArmReachFamily):
    """arm_reach with a single held-out target as its only training task."""

    name = "arm_reach_one"

    def __init__(self, index: int) -> None:
        super().__init__()
        self._train = [self._test[index]]


def run(family: OneTarget, l2: float, steps: int, seed: int, episodes: int) -> dict:
    cfg = replace(load_config(share_file("config/arm_reach_train.yaml")), use_context=False,
                  start_steps=min(2000, steps // 2), actor_preactivation_l2=l2)
    agent, _ = meta_train(family, cfg, steps, seed=seed, progress=False)
    task = family.train_tasks()[0]
    eps = rollout(make_checked_env(family, task, "eval"), agent, episodes=episodes,
                  rng=np.random.default_rng(seed))
    actions = np.concatenate([e.actions for e in eps])
    return {"actor_preactivation_l2": l2, "return": float(np.mean([e.total_reward for e in eps])),
            "final_distance_m": float(np.mean([-e.rewards[-1] for e in eps])),
            "saturated_fraction": float(np.mean(np.abs(actions) > 0.99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15000)
    parser.add_argument("--l2", type=float, default=0.01, help="the penalty to compare against 0")
    parser.add_argument("--task", type=int, default=0, help="which held-out arm_reach target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=3, help="evaluation episodes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    family = OneTarget(args.task)
    rows = [run(family, l2, args.steps, args.seed, args.episodes) for l2 in (0.0, args.l2)]
    oracle = family.oracle_return(family.train_tasks()[0])
    print(f"one arm_reach target (test/{args.task}), TD3 without context, {args.steps} steps, seed {args.seed}; "
          f"oracle return {oracle:.2f}")
    print(f"{'actor_preactivation_l2':>24} {'return':>8} {'final dist (m)':>15} {'saturated':>10}")
    for r in rows:
        print(f"{r['actor_preactivation_l2']:>24g} {r['return']:>8.2f} {r['final_distance_m']:>15.3f} "
              f"{r['saturated_fraction']:>10.2f}")
    base, pen = rows
    print(f"final distance ratio (penalty / none): {pen['final_distance_m'] / base['final_distance_m']:.2f}")
    if args.json:
        print(json.dumps({"oracle_return": oracle, "runs": rows}))


if __name__ == "__main__":
    main()
