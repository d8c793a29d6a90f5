"""Where does an arm_reach meta policy lose its precision: in the context, or in the actor's use of it?

The target of an arm_reach task is never observed; the context z (a GRU over the episode so far) has to
carry it. These measurements on the first --tasks train, held-out (test) and out-of-distribution (ood) targets,
side by side:

  context    how well z *can* tell the target: a 2-layer MLP fit to map z -> target (x, y) on the
             train tasks' rollouts, its error on held-out rollouts by step of the episode
  policy     how far the meta policy's tool actually is from the target at those steps
  observed   (with --observed-steps N) the same meta-training run, but the target appended to the
             observation and no context: the precision the TD3 learner reaches when nothing is inferred;
             or (--observed-checkpoint C) a checkpoint trained that way by `mql-ros train` with the
             shipped recipe's commands (the README's "What a policy that is told the target reaches")
  identified (with either) identify, then act: that policy shown the target decoded from z at the end of
             the meta policy's first episode on the task, i.e. what one episode of new-task data is worth
             to a policy that can use a target estimate

  oracle     the oracle (ArmReachFamily.oracle_rewards): its tool distance by step on the resets it is
             scored on

Each return is also split at step ARRIVAL (the oracle is there by then): what is lost on the way to the target,
and what is lost holding short of it. If z tells the target to ~2 cm while the policy sits 5-10 cm away, the
loss is in the actor's use of z, not in the information z carries.

    python benchmarks/target_inference.py [--checkpoint C] [--tasks 10] [--observed-steps 100000 |
                                          --observed-checkpoint OBSERVED.pt]
    # ~2 min without --observed-steps; 100000 observed steps add ~20 min of meta-training
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import gymnasium
import numpy as np
import torch

from mql_ros.core.checkpoint import agent_from_checkpoint, load_checkpoint
from mql_ros.core.paths import share_file
from mql_ros.core.replay import episodes_to_batch
from mql_ros.core.tasks import make_checked_env, resolve_family, split_tasks
from mql_ros.core.training import meta_train, rollout
from mql_ros.sim.families import ArmReachFamily

STEPS = (0, 2, 5, 10, 20, 40, 49)
SPLITS = ("train", "test", "ood")  # the decoder is fit on train rollouts; ood targets are beyond the trained range
ARRIVAL = 10  # step by which the oracle's tool is at the target (0.1 cm on the first 5 held-out targets)


class TargetInObservation(gymnasium.ObservationWrapper):
    """The arm's observation with a target [x, y, z] appended: the task's own, or `shown` (an estimate of it)."""

    def __init__(self, env: gymnasium.Env, shown: np.ndarray | None = None) -> None:
        super().__init__(env)
        space = env.observation_space
        self.observation_space = gymnasium.spaces.Box(np.append(space.low, [-np.inf] * 3).astype(np.float32),
                                                      np.append(space.high, [np.inf] * 3).astype(np.float32))
        target = env.unwrapped.task["target"] if shown is None else shown
        self._target = np.asarray(target, dtype=np.float32)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        return np.concatenate([obs, self._target]).astype(np.float32)


class ObservedTargetReach(ArmReachFamily):
    """arm_reach, same splits, but the target is in the observation (a diagnostic, not a meta task)."""

    name = "arm_reach_observed_target"

    def make_env(self, task: dict) -> gymnasium.Env:
        return TargetInObservation(super().make_env(task))


def load_observed(path: str, parser: argparse.ArgumentParser):
    """The agent of a target-observed checkpoint; any other checkpoint exits 2 before any work."""
    ckpt = load_checkpoint(path)
    if resolve_family(ckpt.family).name != ObservedTargetReach.name:
        parser.error(f"--observed-checkpoint {path} was meta-trained on {ckpt.family!r}, not on "
                     f"{ObservedTargetReach.name!r} (the target in the observation)")
    return agent_from_checkpoint(ckpt)


def rollouts(agent, family, tasks: list[dict], episodes: int, seed: int) -> list[tuple[dict, object]]:
    rng = np.random.default_rng(seed)
    return [(task, e) for i, task in enumerate(tasks)
            for e in rollout(make_checked_env(family, task, f"t{i}"), agent, episodes=episodes, rng=rng)]


def decoded_target(decoder: torch.nn.Module, agent, task: dict, episode) -> np.ndarray:
    """The target [x, y, z] as the decoder reads it from z at the last step of one episode on `task` (the height,
    the same for every arm_reach target, is the task's)."""
    z, _, _ = contexts(agent, [(task, episode)])
    with torch.no_grad():
        xy = decoder(z[-1:])[0].numpy()
    return np.array([xy[0], xy[1], task["target"][2]])


def _identified_rollouts(observed_agent, decoder, agent, family, runs, episodes: int, seed: int) -> list:
    """Identify, then act: the target decoded from each task's first episode of the meta policy (one episode of
    new-task data, as adaptation gets), shown to the target-observed policy, which then acts on the true task."""
    rng, out, first = np.random.default_rng(seed), [], {}
    for task, episode in runs:
        first.setdefault(json.dumps(task, sort_keys=True), (task, episode))
    for i, (task, episode) in enumerate(first.values()):
        env = TargetInObservation(family.make_env(task), shown=decoded_target(decoder, agent, task, episode))
        out += [(task, e) for e in rollout(env, observed_agent, episodes=episodes, rng=rng, task_id=f"t{i}")]
    return out


def contexts(agent, runs) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """z of every step, the target (x, y) it should tell, and the step index."""
    z, target, step = [], [], []
    for task, episode in runs:
        batch = episodes_to_batch([episode], agent.cfg.history_len)
        with torch.no_grad():
            z.append(agent.contexts(batch.hist, batch.hist_len))
        target.append(torch.tensor([task["target"][:2]] * len(episode), dtype=torch.float32))
        step.append(np.arange(len(episode)))
    return torch.cat(z), torch.cat(target), np.concatenate(step)


def fit_decoder(z: torch.Tensor, target: torch.Tensor, iters: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(z.shape[1], 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                              torch.nn.ReLU(), torch.nn.Linear(256, 2))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(iters):
        idx = torch.randint(0, len(z), (256,))
        loss = (net(z[idx]) - target[idx]).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def _by_step(values: np.ndarray, step: np.ndarray) -> dict[int, float]:
    return {s: float(values[step == s].mean()) for s in STEPS if np.any(step == s)}


def _cells(by_step: dict[int, float]) -> str:
    """One markdown cell per STEPS entry (empty where the episodes were shorter)."""
    return " | ".join(f"{by_step[s]:.1f}" if s in by_step else "" for s in STEPS)


def _returns(rewards: np.ndarray) -> dict[str, float]:
    """Mean return of (episodes, steps) rewards, whole and split at ARRIVAL."""
    return {"return": float(rewards.sum(axis=1).mean()),
            "return_before_arrival": float(rewards[:, :ARRIVAL].sum(axis=1).mean()),
            "return_after_arrival": float(rewards[:, ARRIVAL:].sum(axis=1).mean())}


def _measured(rewards: np.ndarray) -> dict:
    """Tool distance by step (cm) and the returns of (episodes, steps) rewards (minus the distance in m)."""
    step = np.tile(np.arange(rewards.shape[1]), rewards.shape[0])
    return {"distance_cm": {s: 100 * v for s, v in _by_step(-rewards.reshape(-1), step).items()}, **_returns(rewards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoints/arm_reach.pt")
    parser.add_argument("--tasks", type=int, default=10, help="first N train and test targets evaluated")
    parser.add_argument("--episodes", type=int, default=2, help="deterministic episodes per target")
    parser.add_argument("--decoder-iters", type=int, default=4000)
    parser.add_argument("--observed-steps", type=int, default=0,
                        help="also meta-train with the target observed for this many steps (0: skip)")
    parser.add_argument("--observed-checkpoint", default=None,
                        help="evaluate this target-observed checkpoint (mql-ros train --family "
                        "benchmarks.target_inference:ObservedTargetReach) instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.observed_steps and args.observed_checkpoint:
        parser.error("--observed-steps trains a target-observed run, --observed-checkpoint loads one: give one")
    torch.set_num_threads(1)

    path = args.checkpoint or str(share_file("checkpoints/arm_reach.pt"))
    ckpt = load_checkpoint(path)
    agent = agent_from_checkpoint(ckpt)
    family = ArmReachFamily()
    if ckpt.family != family.name:
        parser.error(f"{path} was meta-trained on {ckpt.family!r}; this benchmark is about arm_reach")
    observed = ObservedTargetReach()
    observed_agent = load_observed(args.observed_checkpoint, parser) if args.observed_checkpoint else None
    # The decoder learns from every train target (the region z must cover), and is scored on held-out ones.
    fit_runs = rollouts(agent, family, split_tasks(family, "train"), args.episodes, args.seed)
    decoder = fit_decoder(*contexts(agent, fit_runs)[:2], args.decoder_iters, args.seed)

    result: dict = {"checkpoint": path, "steps": list(STEPS)}
    runs_by_split = {}
    for split in SPLITS:
        tasks = split_tasks(family, split)[: args.tasks]
        runs = [r for r in fit_runs if r[0] in tasks] if split == "train" else \
            rollouts(agent, family, tasks, args.episodes, args.seed)
        runs_by_split[split] = runs
        z, target, step = contexts(agent, runs)
        with torch.no_grad():
            error = (decoder(z) - target).norm(dim=1).numpy()
        result[split] = {
            "context_error_cm": {s: 100 * v for s, v in _by_step(error, step).items()},
            "policy": _measured(np.stack([e.rewards for _, e in runs])),
            "oracle": _measured(np.concatenate([family.oracle_rewards(t) for t in tasks])),
        }

    if args.observed_steps:
        cfg = replace(ckpt.config, use_context=False)
        observed_agent, _ = meta_train(observed, cfg, args.observed_steps, seed=args.seed, progress=False)
    if observed_agent is not None:
        for split in SPLITS:
            runs = rollouts(observed_agent, observed, split_tasks(observed, split)[: args.tasks], args.episodes,
                             args.seed)
            result[split]["observed"] = _measured(np.stack([e.rewards for _, e in runs]))
            identified = _identified_rollouts(observed_agent, decoder, agent, family, runs_by_split[split],
                                              args.episodes, args.seed)
            result[split]["identified"] = _measured(np.stack([e.rewards for _, e in identified]))

    print(f"checkpoint {path}; first {args.tasks} targets per split, {args.episodes} episodes each"
          + (f"; target-observed run {args.observed_steps} steps" if args.observed_steps else "")
          + (f"; target-observed checkpoint {args.observed_checkpoint}" if args.observed_checkpoint else ""))
    print("| split | measure | " + " | ".join(f"step {s}" for s in STEPS)
          + f" | return | steps 0-{ARRIVAL - 1} | steps {ARRIVAL}-end |")
    print("|---|---|" + "---|" * (len(STEPS) + 3))
    for split in SPLITS:
        row = result[split]
        print(f"| {split} | target error decoded from z (cm) | {_cells(row['context_error_cm'])} | | | |")
        for key, label in (("policy", "meta policy's tool distance (cm)"),
                           ("observed", "tool distance, target observed (cm)"),
                           ("identified", "target-observed policy shown the target decoded from one episode (cm)"),
                           ("oracle", "oracle's tool distance (cm)")):
            if key in row:
                m = row[key]
                print(f"| {split} | {label} | {_cells(m['distance_cm'])} | {m['return']:.2f} | "
                      f"{m['return_before_arrival']:.2f} | {m['return_after_arrival']:.2f} |")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
