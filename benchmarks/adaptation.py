"""How much of the zero-shot-to-oracle gap does MQL close with at most one episode of new-task data?

For each held-out (test) and out-of-distribution (ood) task of a family, and for each seed:
  zero-shot    the meta-trained policy, context inferred online, no update
  MQL          collect one episode with the meta policy, then propensity-weighted adaptation
               against the meta-training snapshot (mql_ros.core.adaptation.adapt, the config's defaults)
  MQL other-lambda  the same with the other proximal rule: lambda = 1 - ESS where the checkpoint's config
               fixes lambda (the library default, as in the authors' released configurations), fixed
               lambda where it uses ESS: the ablation that decides the default
  (MQL uses the checkpoint's adaptation config, with any --adapt-set KEY=VALUE overrides.)
  fine-tuning  the same episode, the same TD3 iterations, no archive / propensity / proximal term
  proximal fine-tuning  fine-tuning with MQL's proximal pull toward the meta weights (its lambda rule; no
               archive, so "ess" uses the no-archive ESS): what MQL gains over it is the archive's share
  oracle       a per-task oracle that knows the task: the family's `oracle_return(task)` where it has one
               (arm families: the best held joint target found by sampled inverse kinematics, corrected on
               the real task for the servos' gravity sag, with the approach's first commands searched by the
               cross-entropy method on the true task, scored over 20 random resets; point_goal: the exact
               optimum), computed once per split;
               otherwise a per-task policy trained from the meta weights on abundant data of that task alone
               (--oracle-episodes, --oracle-updates)
gap closed = (method - zero-shot) / (oracle - zero-shot), computed on the split means (n/a where the oracle
is not above zero-shot: there is no gap to close, and a fraction of a negative one flips sign), with a 90% bootstrap
interval (tasks resampled, then seeds within each task) for it and for MQL's lead over each fine-tuning: with a
handful of tasks one adaptation can move a task's return by more than the whole gap.

The seed changes the new-task episode's and the evaluation episodes' initial states, the snapshot rollouts
and the update sampling; the meta-trained checkpoint is the same for every seed (one meta-training run).

    python benchmarks/adaptation.py [--checkpoint checkpoints/arm_reach.pt] [--seeds 3] [--json]
        [--adapt-set archive_iters=400 proximal=ess ...]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

import adapt_setup  # benchmarks/adapt_setup.py, beside this script
import numpy as np

from mql_ros.core.replay import MultiTaskReplay
from mql_ros.core.snapshots import rollout_snapshots
from mql_ros.core.tasks import make_checked_env, resolve_family, split_tasks, task_id
from mql_ros.core.training import evaluate, evaluate_adapted, finetune_config, rollout

METHODS = ("zero-shot", "MQL", "MQL other-lambda", "fine-tuning", "proximal fine-tuning", "oracle")
ADAPTED = ("MQL", "MQL other-lambda", "fine-tuning", "proximal fine-tuning")
LEADS = (("MQL", "fine-tuning"), ("MQL", "proximal fine-tuning"))
MIN_GAP = 1e-9  # return units: how much the oracle must beat zero-shot by for a gap closed to be reported


def trained_oracle_returns(agent, family, tasks, split, episodes, n_episodes, n_updates, seed) -> list[float]:
    """Per task, for a family without its own oracle_return: train from the meta weights on abundant data of
    that task alone and evaluate."""
    rng = np.random.default_rng(seed)
    meta = agent.snapshot()
    out = []
    try:
        for i, task in enumerate(tasks):
            name = task_id(family, split, i)
            env = make_checked_env(family, task, name)
            replay = MultiTaskReplay(agent.cfg.history_len, agent.cfg.replay_size)
            for e in rollout(env, agent, episodes=n_episodes, noise=agent.cfg.expl_noise, rng=rng, task_id=name):
                replay.add_episode(e)
            for _ in range(n_updates):
                agent.update(replay.sample(agent.cfg.batch_size, rng))
            eps = rollout(env, agent, episodes=episodes, rng=rng, task_id=name)
            out.append(float(np.mean([e.total_reward for e in eps])))
            agent.restore(meta)
    finally:
        agent.restore(meta)
    return out


def gap_closed(means: dict[str, float], adapted: tuple[str, ...] = ADAPTED) -> dict[str, float]:
    """(method - zero-shot) / (oracle - zero-shot) for each adapted method; NaN where the oracle is not above
    zero-shot, since a fraction of a gap that is not there (or runs the other way) says nothing."""
    gap = means["oracle"] - means["zero-shot"]
    return {m: (means[m] - means["zero-shot"]) / gap if gap >= MIN_GAP else float("nan") for m in adapted}


def gap_intervals(cells: dict[str, np.ndarray], rng: np.random.Generator, reps: int = 2000,
                  adapted: tuple[str, ...] = ADAPTED, leads: tuple[tuple[str, str], ...] = LEADS) -> dict:
    """90% bootstrap intervals of each adapted method's gap closed and of each of the `leads` of one method
    over another (as a share of the gap). cells[method] holds seeds x tasks returns; tasks are resampled, then
    seeds within each drawn task, since a task's returns over seeds are not independent of each other. NaN
    when more than 5% of the draws have the oracle not above zero-shot (gap_closed has no value there): then
    the gap's own interval reaches zero, a fraction of it is unbounded, and dropping those draws would hide
    that."""
    n_seeds, n_tasks = cells["zero-shot"].shape
    draws: dict[str, list[float]] = {m: [] for m in (*adapted, *(f"{a} - {b}" for a, b in leads))}
    no_gap = 0
    for _ in range(reps):
        t = rng.integers(0, n_tasks, size=n_tasks)
        s = rng.integers(0, n_seeds, size=(n_seeds, n_tasks))
        means = {m: float(v[s, t].mean()) for m, v in cells.items()}
        closed = gap_closed(means, adapted)
        if math.isnan(closed[adapted[0]]):
            no_gap += 1
            continue
        for m in adapted:
            draws[m].append(closed[m])
        for a, b in leads:
            draws[f"{a} - {b}"].append(closed[a] - closed[b])
    if no_gap > 0.05 * reps:
        return {m: [float("nan")] * 2 for m in draws}
    return {m: [float(np.percentile(v, 5)), float(np.percentile(v, 95))] for m, v in draws.items()}


def split_row(cells: dict[str, list], adapted: tuple[str, ...] = ADAPTED,
              leads: tuple[tuple[str, str], ...] = LEADS) -> dict:
    """One split's table row from cells[method] = per seed, the per-task returns: means, spread over seeds, gap
    closed with its bootstrap interval, and the per-task returns (for --json)."""
    arrays = {m: np.asarray(v, dtype=np.float64) for m, v in cells.items()}
    means = {m: float(v.mean()) for m, v in arrays.items()}
    n_seeds, n_tasks = arrays["zero-shot"].shape
    return {"tasks": n_tasks, "seeds": n_seeds, "mean": means,
            "std_over_seeds": {m: float(v.mean(axis=1).std()) for m, v in arrays.items()},
            "gap_closed": gap_closed(means, adapted),
            "gap_closed_90": gap_intervals(arrays, np.random.default_rng(0), adapted=adapted, leads=leads),
            "per_task": {m: v.tolist() for m, v in arrays.items()}}


def fraction_cell(x: float) -> str:
    """A gap fraction for a table cell: n/a where there is none (no gap, or no interval)."""
    return "n/a" if math.isnan(x) else f"{x:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    adapt_setup.add_arguments(parser)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--splits", nargs="+", default=["test", "ood"])
    parser.add_argument("--tasks", type=int, default=0, help="first N tasks of each split (0: all)")
    parser.add_argument("--episodes", type=int, default=3, help="evaluation episodes per task")
    parser.add_argument("--oracle-episodes", type=int, default=20)
    parser.add_argument("--oracle-updates", type=int, default=1000)
    args = parser.parse_args()
    path, ckpt, agent, cfg = adapt_setup.load(args, parser)
    family = resolve_family(ckpt.family)
    other_rule = "ess" if cfg.proximal == "fixed" else "fixed"
    start = time.perf_counter()
    table: dict = {}
    for split in args.splits:
        tasks = split_tasks(family, split)
        tasks = tasks[: args.tasks] if args.tasks else tasks
        cells = {m: [] for m in METHODS}  # per seed: the per-task returns
        # the family's own oracle does not depend on the seed: computed once (arm_payload's searches for seconds a task)
        family_oracle = [float(family.oracle_return(t)) for t in tasks] if hasattr(family, "oracle_return") else None
        for seed in range(args.seeds):
            snapshot = rollout_snapshots(agent, family, episodes_per_task=4, seed=seed)
            cells["zero-shot"].append(evaluate(agent, family, tasks, args.episodes, seed=seed))
            cells["MQL"].append(evaluate_adapted(agent, family, tasks, snapshot, cfg, args.episodes, seed=seed,
                                                 split=split)[0])
            cells["MQL other-lambda"].append(evaluate_adapted(agent, family, tasks, snapshot,
                                                              replace(cfg, proximal=other_rule), args.episodes,
                                                              seed=seed, split=split)[0])
            cells["fine-tuning"].append(evaluate_adapted(agent, family, tasks, None, finetune_config(cfg),
                                                         args.episodes, seed=seed, split=split)[0])
            proximal_only = replace(cfg, use_archive=False, use_propensity=False)
            cells["proximal fine-tuning"].append(evaluate_adapted(agent, family, tasks, None, proximal_only,
                                                                  args.episodes, seed=seed, split=split)[0])
            cells["oracle"].append(family_oracle if family_oracle is not None else trained_oracle_returns(
                agent, family, tasks, split, args.episodes, args.oracle_episodes, args.oracle_updates, seed))
            print(f"[{time.perf_counter() - start:6.0f} s] {split} seed {seed}: "
                  + ", ".join(f"{m} {np.mean(cells[m][-1]):.2f}" for m in METHODS), flush=True)
        table[split] = split_row(cells)
    print(f"\ncheckpoint {path} ({family.name}); {args.seeds} seeds; {args.episodes} eval episodes per task; "
          f"adaptation {cfg.new_task_iters}+{cfg.archive_iters} iterations, MQL lambda {cfg.proximal}, "
          f"other-lambda {other_rule}; "
          + (f"--adapt-set {' '.join(args.adapt_set)}; " if args.adapt_set else "")
          + (f"oracle: {family.name}.oracle_return" if hasattr(family, "oracle_return") else
           f"oracle {args.oracle_episodes} episodes / {args.oracle_updates} updates per task"))
    print(f"| split | tasks | {' | '.join(METHODS)} | " + " | ".join(f"gap closed: {m}" for m in ADAPTED) + " |")
    print("|---|---|" + "---|" * (len(METHODS) + len(ADAPTED)))
    for split, row in table.items():
        returns = " | ".join(f"{row['mean'][m]:.2f} ± {row['std_over_seeds'][m]:.2f}" for m in METHODS)
        gaps = " | ".join(fraction_cell(row["gap_closed"][m]) for m in ADAPTED)
        print(f"| {split} | {row['tasks']} | {returns} | {gaps} |")
    print("\n90% bootstrap intervals of the gap closed (tasks resampled, then seeds within each task):")
    print(f"| split | {' | '.join(ADAPTED)} | " + " | ".join(f"{a} - {b}" for a, b in LEADS) + " |")
    print("|---|" + "---|" * (len(ADAPTED) + len(LEADS)))
    for split, row in table.items():
        print(f"| {split} | " + " | ".join(f"[{fraction_cell(lo)}, {fraction_cell(hi)}]"
                                           for lo, hi in row["gap_closed_90"].values()) + " |")
    for split, row in table.items():
        if math.isnan(row["gap_closed"]["MQL"]):
            print(f"{split}: the oracle ({row['mean']['oracle']:.2f}) is not above zero-shot "
                  f"({row['mean']['zero-shot']:.2f}), so there is no gap to close (n/a); compare the returns")
        elif math.isnan(row["gap_closed_90"]["MQL"][0]):
            print(f"{split}: the gap ({row['mean']['oracle'] - row['mean']['zero-shot']:.2f}) is within the "
                  "task-to-task spread (in over 5% of the bootstrap draws there is none), so its fractions have no "
                  "interval (n/a); compare the returns")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        print(json.dumps(table))


if __name__ == "__main__":
    main()
