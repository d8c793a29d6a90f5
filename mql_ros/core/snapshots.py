"""Per-task snapshot buffers rebuilt by rolling out a meta-trained policy.

MQL's propensity model contrasts new-task transitions with each training task's *latest* transitions
(../shared/MQL.md: snapshot buffers of the last 2000 per task). Near the end of meta-training those come
from the meta policy plus exploration noise, so when the archive of the real meta-training data is not at
hand (the demo, a quick eval) the same kind of data is collected anew, on the family's train tasks.
"""

from __future__ import annotations

import numpy as np

from mql_ros.core.replay import MultiTaskReplay
from mql_ros.core.tasks import TaskFamily, make_checked_env, resolve_family, split_tasks, task_id
from mql_ros.core.td3 import TD3Context
from mql_ros.core.training import rollout


def rollout_snapshots(agent: TD3Context, family: TaskFamily | str, episodes_per_task: int = 4,
                      noise: float | None = None, seed: int = 0) -> MultiTaskReplay:
    """A replay holding `episodes_per_task` episodes of every train task, acted by `agent` with
    exploration noise (the agent's training noise by default), tagged with the train task ids."""
    family = resolve_family(family)
    noise = agent.cfg.expl_noise if noise is None else noise
    rng = np.random.default_rng(seed)
    replay = MultiTaskReplay(agent.cfg.history_len, agent.cfg.replay_size)
    for i, task in enumerate(split_tasks(family, "train")):
        name = task_id(family, "train", i)
        for episode in rollout(make_checked_env(family, task, name), agent, episodes=episodes_per_task,
                               noise=noise, rng=rng, task_id=name):
            replay.add_episode(episode)
    return replay
