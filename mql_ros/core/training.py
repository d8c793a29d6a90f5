"""Rollouts, multi-task meta-training (TD3-context) and evaluation on a task family.

Meta-training is plain off-policy TD3 on the union of the train tasks (../shared/MQL.md): collect one
episode of a train task (round-robin, shuffled each cycle, so every task gets equal data), store it, then
take `updates_per_step` TD3 iterations per collected step, as the authors' code does. Collecting whole
episodes before updating keeps the actor fixed within an episode, so the streaming context used to act
equals the batched context the learner later recomputes for the same window.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import gymnasium
import numpy as np
from tqdm import tqdm

from mql_ros.core.adaptation import AdaptationReport, adapt
from mql_ros.core.config import AdaptConfig, MQLConfig
from mql_ros.core.context import context_input_scale
from mql_ros.core.episode import Episode
from mql_ros.core.errors import InputError
from mql_ros.core.replay import MultiTaskReplay, ReplayStore
from mql_ros.core.tasks import CheckedEnv, TaskFamily, make_checked_env, resolve_family, split_tasks, task_id
from mql_ros.core.td3 import TD3Context

if TYPE_CHECKING:
    from mql_ros.core.runtime import DeployedPolicy

MAX_EPISODE_STEPS = 100_000  # a family env that never ends an episode is cut here (as a time limit)


def _new_context(agent):
    """The streaming context of a TD3Context (training) or a DeployedPolicy (runtime)."""
    return agent.streaming_context() if hasattr(agent, "streaming_context") else agent.new_context()


def rollout(env: gymnasium.Env, agent_or_policy: TD3Context | DeployedPolicy | None, episodes: int = 1,
            noise: float = 0.0, rng: np.random.Generator | None = None, task_id: str = "") -> list[Episode]:
    """Run `episodes` episodes; agent_or_policy None means uniformly random actions (TD3's warm-up).

    The policy acts deterministically plus Gaussian `noise` (clipped to [-1, 1]); its context is updated
    one step at a time with the entry (a_t, r_t, s_t) after each step, exactly as the context node does.
    """
    if episodes < 1:
        raise InputError(f"rollout: episodes must be >= 1, got {episodes}")
    if not isinstance(env, CheckedEnv):
        env = CheckedEnv(env, "env", task_id)
    rng = rng if rng is not None else np.random.default_rng()
    out = []
    for _ in range(episodes):
        obs, _ = env.reset(seed=int(rng.integers(2**31)))
        ctx = _new_context(agent_or_policy) if agent_or_policy is not None else None
        observations, actions, rewards = [obs], [], []
        terminated = False
        for _ in range(MAX_EPISODE_STEPS):
            if agent_or_policy is None:
                action = rng.uniform(-1.0, 1.0, size=env.act_dim).astype(np.float32)
            else:
                action = np.asarray(agent_or_policy.act(obs, ctx.context), dtype=np.float32)
                if noise > 0:
                    action = np.clip(action + rng.normal(0.0, noise, size=action.shape), -1.0, 1.0)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            if ctx is not None:
                ctx.push(obs, action, reward)
            actions.append(action)
            rewards.append(reward)
            observations.append(next_obs)
            obs = next_obs
            if terminated or truncated:
                break
        out.append(Episode(task_id, np.asarray(observations), np.asarray(actions), np.asarray(rewards),
                           terminated=bool(terminated)))
    return out


def _mean_dicts(dicts: list[dict[str, float]]) -> dict[str, float]:
    keys = {k for d in dicts for k in d}
    return {k: float(np.mean([d[k] for d in dicts if k in d])) for k in sorted(keys)}


def meta_train(family: TaskFamily | str, cfg: MQLConfig, steps: int, replay: ReplayStore | None = None,
               seed: int = 0, progress: bool = True, on_episode: Callable[[Episode], None] | None = None,
               log_every: int = 1000, init: TD3Context | None = None) -> tuple[TD3Context, list[dict]]:
    """TD3-context on all train tasks of `family` for `steps` environment steps.

    Returns the agent and a learning curve: one dict per `log_every` steps with the step, the mean
    return of the training episodes since the last entry (exploration noise included), mean losses and
    the wall-clock seconds so far. `on_episode` sees every collected episode (e.g. to archive it).
    `init` is an agent to go on training (TD3Context.continue_with(cfg)) instead of a fresh one: its weights,
    target networks and context input scale carry over, its optimizers start afresh at cfg.lr; it learns only
    from `replay` (a new, empty one by default) and what this run collects.
    """
    family = resolve_family(family)
    if steps < 1:
        raise InputError(f"meta_train: steps must be >= 1, got {steps}")
    if log_every < 1:
        raise InputError(f"meta_train: log_every must be >= 1, got {log_every}")
    tasks = split_tasks(family, "train")
    if not tasks:
        raise InputError(f"family {family.name!r} has no train tasks")
    ids = [task_id(family, "train", i) for i in range(len(tasks))]
    envs = [make_checked_env(family, t, ids[i]) for i, t in enumerate(tasks)]
    if init is None:
        agent = TD3Context(cfg, envs[0].obs_dim, envs[0].act_dim, seed=seed)
    else:
        agent = init
        agent.continue_with(cfg)
    for i, env in enumerate(envs):
        if (env.obs_dim, env.act_dim) != (agent.obs_dim, agent.act_dim):
            raise InputError(f"family {family.name!r}: task {ids[i]} has obs/act dims {env.obs_dim}/"
                             f"{env.act_dim}, task {ids[0]} has {agent.obs_dim}/{agent.act_dim}")
    replay = replay if replay is not None else MultiTaskReplay(cfg.history_len, cfg.replay_size)
    rng = np.random.default_rng(seed)
    curve: list[dict] = []
    returns: list[float] = []
    losses: list[dict[str, float]] = []
    order: list[int] = []
    warmup: list[Episode] = []  # what the context input scale is computed from, before the first update
    done_steps, next_log, start = 0, log_every, time.perf_counter()
    bar = tqdm(total=steps, desc=f"meta-train {family.name}", unit="step", disable=not progress)
    while done_steps < steps:
        if not order:
            order = list(rng.permutation(len(tasks)))
        i = int(order.pop())
        policy = agent if done_steps >= cfg.start_steps else None
        episode = rollout(envs[i], policy, noise=cfg.expl_noise, rng=rng, task_id=ids[i])[0]
        replay.add_episode(episode)
        if on_episode is not None:
            on_episode(episode)
        done_steps += len(episode)
        returns.append(episode.total_reward)
        bar.update(len(episode))
        if agent.updates == 0 and cfg.normalize_context_inputs:  # a continued agent keeps the scale it has
            warmup.append(episode)
        if done_steps >= cfg.start_steps and replay.num_transitions() >= cfg.batch_size:
            if warmup:
                agent.set_context_input_scale(context_input_scale(warmup))
                warmup = []
            for _ in range(len(episode) * cfg.updates_per_step):
                losses.append(agent.update(replay.sample(cfg.batch_size, rng)))
        if done_steps >= next_log or done_steps >= steps:
            entry = {"step": done_steps, "mean_return": float(np.mean(returns)), "episodes": len(returns),
                     "updates": agent.updates, "seconds": time.perf_counter() - start, **_mean_dicts(losses)}
            curve.append(entry)
            bar.set_postfix(ret=f"{entry['mean_return']:.2f}")
            returns, losses = [], []
            next_log = (done_steps // log_every + 1) * log_every
    bar.close()
    return agent, curve


def evaluate(agent: TD3Context | DeployedPolicy, family: TaskFamily | str, tasks: Sequence[dict], episodes: int = 1,
             seed: int = 0, split: str = "eval") -> list[float]:
    """Mean return of the deterministic policy on each task over `episodes` episodes (zero-shot: the
    context starts empty every episode and is inferred on the way). Errors name task i as F/split/i."""
    family = resolve_family(family)
    rng = np.random.default_rng(seed)
    out = []
    for i, task in enumerate(tasks):
        name = f"{family.name}/{split}/{i}"
        env = make_checked_env(family, task, name)
        eps = rollout(env, agent, episodes=episodes, noise=0.0, rng=rng, task_id=name)
        out.append(float(np.mean([e.total_reward for e in eps])))
    return out


def finetune_config(cfg: AdaptConfig) -> AdaptConfig:
    """Naive fine-tuning as an AdaptConfig: the same TD3 iterations on the same new-task data, with no
    archive, no propensity weights and no proximal term."""
    return replace(cfg, use_archive=False, use_propensity=False, proximal="off")


def collect_new_task_data(agent: TD3Context | DeployedPolicy, env: CheckedEnv, new_steps: int,
                          rng: np.random.Generator, task_name: str) -> list[Episode]:
    """MQL step 2: episodes of the deterministic meta policy on the new task, at least `new_steps`
    transitions (0 = exactly one episode)."""
    episodes: list[Episode] = []
    while not episodes or sum(len(e) for e in episodes) < new_steps:
        episodes += rollout(env, agent, noise=0.0, rng=rng, task_id=task_name)
    return episodes


def evaluate_adapted(agent: TD3Context, family: TaskFamily | str, tasks: Sequence[dict],
                     archive: ReplayStore | None, cfg: AdaptConfig, episodes: int = 1, seed: int = 0,
                     split: str = "test") -> tuple[list[float], list[AdaptationReport]]:
    """For each task: collect new-task data with the meta policy, adapt, evaluate the adapted policy on
    `episodes` fresh episodes, then restore the meta weights (MQL steps 1-8). Returns the mean return per
    task and each task's adaptation report. Pass finetune_config(cfg) for the naive baseline."""
    family = resolve_family(family)
    rng = np.random.default_rng(seed)
    returns, reports = [], []
    meta = agent.snapshot()
    try:
        for i, task in enumerate(tasks):
            name = task_id(family, split, i)
            env = make_checked_env(family, task, name)
            new = collect_new_task_data(agent, env, cfg.new_steps, rng, name)
            reports.append(adapt(agent, new, archive, cfg, seed=seed + i))
            eps = rollout(env, agent, episodes=episodes, noise=0.0, rng=rng, task_id=name)
            returns.append(float(np.mean([e.total_reward for e in eps])))
            agent.restore(meta)
    finally:
        agent.restore(meta)
    return returns, reports
