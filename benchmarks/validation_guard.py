"""Does the adaptation node's validation guard keep the adaptations that help and refuse those that hurt?

The adaptation node (mql_ros/nodes/adaptation.py) publishes an adapted policy only if
`validate_update` accepts it: its one-step Bellman score on held-back new-task episodes may not be worse
than the current policy's by more than `margin` of it. This measures that rule against what it stands for,
the adapted policy's return on the task.

For each of the first N tasks of a split and each seed: one new-task episode of the meta policy to adapt on
(the checkpoint's adapt: settings, with any --adapt-set overrides) and one more held back for the guard,
as the node does with held_out_episodes: 1; then the adapted policy's return change against the meta
policy's, both on the same fresh evaluation episodes. Printed: the correlation between the guard's relative
score change and the return change, and for each margin the updates accepted and the mean return change of
the policy the guard leaves in place (adapted if accepted, meta if refused), next to the two baselines
measured in the same run: always accept, and a hindsight guard that accepts exactly the updates that helped.

    python benchmarks/validation_guard.py [--checkpoint C] [--split test] [--tasks 5] [--seeds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import adapt_setup  # benchmarks/adapt_setup.py, beside this script
import numpy as np

from mql_ros.core.adaptation import adapt, validate_update
from mql_ros.core.checkpoint import agent_from_checkpoint
from mql_ros.core.snapshots import rollout_snapshots
from mql_ros.core.tasks import make_checked_env, resolve_family, split_tasks, task_id
from mql_ros.core.training import evaluate, rollout

MARGINS = (0.0, 0.1, 0.25, 0.5)  # 0.1 is the node's default (config/mql.yaml)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    adapt_setup.add_arguments(parser)
    parser.add_argument("--split", default="test", choices=("train", "test", "ood"))
    parser.add_argument("--tasks", type=int, default=5, help="first N tasks of the split")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=2, help="evaluation episodes per task and policy")
    args = parser.parse_args()
    path, ckpt, agent, cfg = adapt_setup.load(args, parser)
    meta_agent = agent_from_checkpoint(ckpt)  # the current policy the node would compare with
    family = resolve_family(ckpt.family)
    tasks = split_tasks(family, args.split)[: args.tasks]
    meta = agent.snapshot()
    start = time.perf_counter()
    return_change, score_change, accepted = [], [], {m: [] for m in MARGINS}
    for seed in range(args.seeds):
        archive = rollout_snapshots(agent, family, episodes_per_task=4, seed=seed)
        rng = np.random.default_rng(seed)
        for i, task in enumerate(tasks):
            name = task_id(family, args.split, i)
            env = make_checked_env(family, task, name)
            eval_seed = int(rng.integers(2**31))
            before = evaluate(agent, family, [task], args.episodes, seed=eval_seed)[0]  # same states after
            new = rollout(env, agent, rng=rng, task_id=name)
            held = rollout(env, agent, rng=rng, task_id=name)
            adapt(agent, new, archive, cfg, seed=seed + i)
            after = evaluate(agent, family, [task], args.episodes, seed=eval_seed)[0]
            results = {m: validate_update(agent, meta_agent, held, m) for m in MARGINS}
            agent.restore(meta)
            cur, cand = results[0.0].current_score, results[0.0].candidate_score
            return_change.append(after - before)
            score_change.append((cand - cur) / abs(cur))
            for m, result in results.items():
                accepted[m].append(result.ok)
            print(f"[{time.perf_counter() - start:5.0f} s] seed {seed} task {i}: return {before:.2f} -> {after:.2f}; "
                  f"held-back Bellman score {cur:.4g} -> {cand:.4g}", flush=True)
    d = np.asarray(return_change)
    out = {"tasks": len(tasks), "seeds": args.seeds, "split": args.split,
           "correlation": float(np.corrcoef(d, score_change)[0, 1]) if d.size > 1 else float("nan"),
           "always_accept": float(d.mean()), "hindsight": float(np.maximum(d, 0.0).mean()),
           "margins": {str(m): {"accepted": int(np.sum(a)), "return_change": float(np.where(a, d, 0.0).mean())}
                       for m, a in accepted.items()}}
    print(f"\ncheckpoint {path}; {args.split}, {len(tasks)} tasks x {args.seeds} seeds; adaptation "
          f"{cfg.new_task_iters}+{cfg.archive_iters} iterations, lambda {cfg.proximal}")
    print(f"correlation of the guard's relative score change with the return change: {out['correlation']:.2f}")
    print("| guard | accepted | mean return change of the policy left in place |")
    print("|---|---|---|")
    print(f"| always accept (baseline) | {d.size}/{d.size} | {out['always_accept']:+.3f} |")
    for m, row in out["margins"].items():
        print(f"| validate_update, margin {m} | {row['accepted']}/{d.size} | {row['return_change']:+.3f} |")
    print(f"| hindsight: accept if the return rose | {int(np.sum(d > 0))}/{d.size} | {out['hindsight']:+.3f} |")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
