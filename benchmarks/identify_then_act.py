"""Identify-then-act on arm_reach, in the adaptation benchmark's protocol: what one episode of new-task data is
worth to a policy that can act on a target estimate, beside zero-shot and the oracle.

For each task and seed, with the seed's generator used exactly as benchmarks/adaptation.py uses it for MQL (so the
same new-task episode and the same evaluation resets as MQL's on that seed):
  zero-shot        the meta policy (mql_ros.core.training.evaluate, as in benchmarks/adaptation.py)
  identify-then-act  one episode of the meta policy on the new task; the target (x, y) decoded from its context z
                   at the episode's last step by benchmarks/target_inference.py's decoder (fit on the train
                   targets' rollouts with their true targets); the target-observed policy (--observed-checkpoint,
                   made by the commands in config/arm_reach_observed.yaml) shown that estimate and evaluated on the
                   true task
  told policy      the target-observed policy shown the true target (no identification)
  oracle           ArmReachFamily.oracle_return, as in benchmarks/adaptation.py
gap closed, and its 90% bootstrap interval, as in benchmarks/adaptation.py. This is not MQL: the decoder learns
from the train tasks' true parameters and the acting policy is conditioned on a target estimate. It is measured
to show what a bar on one episode asks for.

    python benchmarks/identify_then_act.py --observed-checkpoint observed.pt [--checkpoint C] [--seeds 3]
        [--tasks 5] [--episodes 2] [--splits test ood] [--json]      # 4 min
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from adaptation import fraction_cell, split_row  # benchmarks/, beside this script
from target_inference import TargetInObservation, contexts, decoded_target, fit_decoder, load_observed, rollouts

from mql_ros.core.checkpoint import agent_from_checkpoint, load_checkpoint
from mql_ros.core.paths import share_file
from mql_ros.core.tasks import make_checked_env, split_tasks, task_id
from mql_ros.core.training import collect_new_task_data, evaluate, rollout
from mql_ros.sim.families import ArmReachFamily

METHODS = ("zero-shot", "identify-then-act", "told policy", "oracle")
ADAPTED = ("identify-then-act", "told policy")


def told_returns(told, decoder, agent, family, tasks, split: str, episodes: int, seed: int,
                 new_steps: int) -> tuple[list[float], list[float]]:
    """Per task: identify-then-act's mean return and the told policy's, on evaluate_adapted's episodes."""
    rng = np.random.default_rng(seed)
    identified, shown_true = [], []
    for i, task in enumerate(tasks):
        name = task_id(family, split, i)
        new = collect_new_task_data(agent, make_checked_env(family, task, name), new_steps, rng, name)
        state = rng.bit_generator.state  # both policies are evaluated from the same resets
        for shown, out in ((decoded_target(decoder, agent, task, new[-1]), identified), (None, shown_true)):
            rng.bit_generator.state = state
            env = TargetInObservation(family.make_env(task), shown=shown)
            out.append(float(np.mean([e.total_reward for e in rollout(env, told, episodes=episodes, rng=rng,
                                                                         task_id=name)])))
    return identified, shown_true


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="meta policy; default: the shipped checkpoints/arm_reach.pt")
    parser.add_argument("--observed-checkpoint", required=True,
                        help="target-observed policy (config/arm_reach_observed.yaml has the commands)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--splits", nargs="+", default=["test", "ood"])
    parser.add_argument("--tasks", type=int, default=5, help="first N tasks of each split")
    parser.add_argument("--episodes", type=int, default=2, help="evaluation episodes per task")
    parser.add_argument("--decoder-iters", type=int, default=4000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = args.checkpoint or str(share_file("checkpoints/arm_reach.pt"))
    ckpt = load_checkpoint(path)
    family = ArmReachFamily()
    if ckpt.family != family.name:
        parser.error(f"{path} was meta-trained on {ckpt.family!r}; identify-then-act is about arm_reach")
    agent, told = agent_from_checkpoint(ckpt), load_observed(args.observed_checkpoint, parser)
    start = time.perf_counter()
    fit = rollouts(agent, family, split_tasks(family, "train"), 2, 0)  # target_inference's decoder, its defaults
    decoder = fit_decoder(*contexts(agent, fit)[:2], args.decoder_iters, 0)

    table: dict = {}
    for split in args.splits:
        tasks = split_tasks(family, split)[: args.tasks]
        oracle = [float(family.oracle_return(t)) for t in tasks]
        cells: dict[str, list] = {m: [] for m in METHODS}
        for seed in range(args.seeds):
            cells["zero-shot"].append(evaluate(agent, family, tasks, args.episodes, seed=seed))
            identified, shown_true = told_returns(told, decoder, agent, family, tasks, split, args.episodes, seed,
                                                  agent.cfg.adapt.new_steps)
            cells["identify-then-act"].append(identified)
            cells["told policy"].append(shown_true)
            cells["oracle"].append(oracle)
            print(f"[{time.perf_counter() - start:6.0f} s] {split} seed {seed}: "
                  + ", ".join(f"{m} {np.mean(cells[m][-1]):.2f}" for m in METHODS), flush=True)
        table[split] = split_row(cells, ADAPTED, leads=())

    print(f"\nmeta policy {path}; told policy {args.observed_checkpoint}; {args.seeds} seeds; {args.episodes} eval "
          "episodes per task; oracle: arm_reach.oracle_return")
    print(f"| split | tasks | {' | '.join(METHODS)} | " + " | ".join(f"gap closed: {m} [90%]" for m in ADAPTED) + " |")
    print("|---|---|" + "---|" * (len(METHODS) + len(ADAPTED)))
    for split, row in table.items():
        returns = " | ".join(f"{row['mean'][m]:.2f} ± {row['std_over_seeds'][m]:.2f}" for m in METHODS)
        gaps = " | ".join(f"{fraction_cell(row['gap_closed'][m])} [{fraction_cell(row['gap_closed_90'][m][0])}, "
                          f"{fraction_cell(row['gap_closed_90'][m][1])}]" for m in ADAPTED)
        print(f"| {split} | {row['tasks']} | {returns} | {gaps} |")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        print(json.dumps(table))


if __name__ == "__main__":
    main()
