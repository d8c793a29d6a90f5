"""MQL adaptation of a meta-trained agent to a new task (../shared/MQL.md, "Adaptation to a new task").

With a handful of new-task transitions, plain fine-tuning overfits. MQL instead re-uses the archive:
a logistic propensity model tells new-task transitions from archived ones by their context, its odds
weight every archived transition by how much it looks like the new task, and a proximal pull toward the
meta-trained weights keeps the few new transitions from dragging the networks away: fixed (lambda 0.1, the
authors' released setting and the default) or set from the normalized ESS of those weights (`proximal: ess`,
lambda = 1 - ESS: little usable archive -> stay close).
Every step can be switched off through AdaptConfig; with use_archive=False, use_propensity=False and
proximal="off" this is exactly naive fine-tuning (training.finetune_config).

Snapshot and rollback (steps 1 and 8) are the caller's: agent.snapshot() / agent.restore().
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from mql_ros.core.config import AdaptConfig
from mql_ros.core.episode import Episode
from mql_ros.core.errors import AdaptationCancelled, InputError
from mql_ros.core.propensity import (
    ESS_FALLBACK,
    LogisticModel,
    fit_logistic,
    normalized_ess,
    odds_weights,
    proximal_coefficient,
    weight_histogram,
)
from mql_ros.core.replay import Batch, ReplayStore, episodes_to_batch
from mql_ros.core.td3 import TD3Context

_FEATURE_CHUNK = 4096  # rows per context computation, to bound memory on large snapshots


@dataclass
class AdaptationReport:
    """What adaptation did, for logs, diagnostics and the ablations."""

    ess: float  # normalized ESS of the archive snapshot's weights (ESS_FALLBACK without archive data)
    proximal_lambda: float
    weight_histogram: tuple  # (bin edges, counts) of the snapshot's weights; () without propensity
    n_new: int  # new-task transitions
    n_archive: int  # archived transitions of the training tasks that adaptation could draw on
    losses: list[dict] = field(default_factory=list)  # one dict per TD3 iteration, with its phase
    task_weights: dict[str, float] = field(default_factory=dict)  # mean weight of each train task's snapshot
    n_negatives: int = 0  # archived transitions used as the propensity model's class B
    propensity_accuracy: float = float("nan")  # training accuracy of the propensity model
    mean_archive_weight: float = float("nan")  # over all archive samples of the weighted iterations
    zero_weight_fraction: float = float("nan")  # of those samples, the share with weight exactly 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weight_histogram"] = [list(p) for p in self.weight_histogram]
        return d


def _features(agent: TD3Context, batch: Batch, kind: str) -> np.ndarray:
    """Propensity features: the actor's context of each transition's window, optionally with its obs."""
    parts = []
    for lo in range(0, len(batch), _FEATURE_CHUNK):
        sub = batch.subset(torch.arange(lo, min(lo + _FEATURE_CHUNK, len(batch))))
        z = agent.contexts(sub.hist, sub.hist_len)
        if kind == "context+obs":
            z = torch.cat([z, sub.obs], dim=1)
        parts.append(z.numpy().astype(np.float64))
    return np.concatenate(parts)


def _check_new_episodes(agent: TD3Context, new_episodes: Sequence[Episode]) -> None:
    if not new_episodes or not all(isinstance(e, Episode) for e in new_episodes):
        raise InputError("adapt: need at least one new-task Episode")
    for e in new_episodes:
        if (e.obs_dim, e.act_dim) != (agent.obs_dim, agent.act_dim):
            raise InputError(f"adapt: episode {e.task_id!r} has obs/act dims {e.obs_dim}/{e.act_dim}, the "
                             f"agent expects {agent.obs_dim}/{agent.act_dim}")
    if sum(len(e) for e in new_episodes) == 0:
        raise InputError("adapt: the new-task episodes hold no transitions")


def _fit_propensity(agent: TD3Context, new: Batch, archive: ReplayStore, train_ids: list[str],
                    cfg: AdaptConfig, rng: np.random.Generator
                    ) -> tuple[LogisticModel, dict[str, np.ndarray], int, float]:
    """Steps 3-4: class A = every new transition, class B = |new| / n_train + 2 transitions from each
    training task's snapshot (its latest snapshot_per_task transitions). Returns the model, the weights of
    each task's whole snapshot (for the ESS and the report), the number of negatives and the training
    accuracy."""
    x_new = _features(agent, new, cfg.propensity_features)
    per_task = len(new) // len(train_ids) + 2
    snapshot, negatives = {}, []
    for tid in train_ids:
        x = _features(agent, archive.recent(tid, cfg.snapshot_per_task), cfg.propensity_features)
        snapshot[tid] = x
        negatives.append(x[rng.choice(x.shape[0], size=min(per_task, x.shape[0]), replace=False)])
    x_neg = np.concatenate(negatives)
    X = np.concatenate([x_neg, x_new])
    y = np.concatenate([np.ones(len(x_neg)), np.zeros(len(x_new))])  # y = 1: the "archive" class
    model = fit_logistic(X, y, C=cfg.propensity_C)
    accuracy = float(np.mean((model.logit(X) > 0) == (y == 1)))
    weights = {tid: odds_weights(model, x, cfg.beta_clip, cfg.min_weight) for tid, x in snapshot.items()}
    return model, weights, len(x_neg), accuracy


def adapt(agent: TD3Context, new_episodes: Sequence[Episode], archive: ReplayStore | None, cfg: AdaptConfig,
          seed: int = 0, stop: Callable[[], bool] | None = None) -> AdaptationReport:
    """Adapt `agent` in place to the task of `new_episodes` (MQL steps 3-7) and report what happened.

    The archive's tasks other than the new episodes' own ids are the training tasks. Without usable
    archive data (None, empty, or use_archive=False) both phases train on the new data alone. `stop` is
    asked before every update; when it says so, AdaptationCancelled (a node shutting down need not wait out
    hundreds of updates, nor leave torch running in a thread at interpreter exit).
    """
    start = time.perf_counter()
    _check_new_episodes(agent, new_episodes)
    rng = np.random.default_rng(seed)
    bs = agent.cfg.batch_size
    new = episodes_to_batch(new_episodes, agent.cfg.history_len)
    new_ids = {e.task_id for e in new_episodes}
    train_ids: list[str] = []
    if cfg.use_archive and archive is not None:
        train_ids = [t for t in archive.task_ids() if t not in new_ids and archive.num_transitions(t) > 0]
    n_archive = sum(archive.num_transitions(t) for t in train_ids) if train_ids else 0

    model, ess, hist, n_neg, acc = None, ESS_FALLBACK, (), 0, float("nan")
    task_weights: dict[str, float] = {}
    if train_ids and cfg.use_propensity:
        model, per_task, n_neg, acc = _fit_propensity(agent, new, archive, train_ids, cfg, rng)
        snap_weights = np.concatenate(list(per_task.values()))
        ess = normalized_ess(snap_weights)
        hist = weight_histogram(snap_weights)
        task_weights = {tid: float(w.mean()) for tid, w in per_task.items()}
    elif train_ids:
        ess = 1.0  # every archived transition weighs 1
    lam = proximal_coefficient(ess, cfg)

    anchor = agent.parameters_snapshot()
    agent.reset_optimizers(cfg.lr)
    losses: list[dict] = []

    def new_rows() -> Batch:
        return new.subset(rng.integers(0, len(new), size=bs))

    def check_stop() -> None:
        if stop is not None and stop():
            raise AdaptationCancelled(f"adaptation stopped after {len(losses)} updates")

    for _ in range(cfg.new_task_iters):  # step 5: new data alone, unweighted, no proximal term
        check_stop()
        losses.append({"phase": "new", **agent.update(new_rows())})

    archive_weights = []
    for _ in range(cfg.archive_iters):  # step 6
        check_stop()
        if train_ids:
            old = archive.sample(bs * cfg.archive_batch_mult, rng, task_ids=train_ids)
            if model is not None:  # beta from the current context, as the authors' code does
                w_old = odds_weights(model, _features(agent, old, cfg.propensity_features), cfg.beta_clip,
                                     cfg.min_weight)
            else:
                w_old = np.ones(len(old))
            archive_weights.append(w_old)
            batch = Batch.concat([new_rows(), old])
            weights = torch.from_numpy(np.concatenate([np.ones(bs), w_old]).astype(np.float32))
            info = agent.update(batch, weights, proximal_lambda=lam, anchor=anchor)
        else:
            info = agent.update(new_rows(), None, proximal_lambda=lam, anchor=anchor)
        phase = "archive" if train_ids else ("new+prox" if lam > 0 else "new")
        losses.append({"phase": phase, **info})

    all_w = np.concatenate(archive_weights) if archive_weights else np.zeros(0)
    return AdaptationReport(
        ess=float(ess), proximal_lambda=float(lam), weight_histogram=hist, n_new=len(new),
        n_archive=n_archive, losses=losses, task_weights=task_weights, n_negatives=n_neg,
        propensity_accuracy=acc,
        mean_archive_weight=float(all_w.mean()) if all_w.size else float("nan"),
        zero_weight_fraction=float(np.mean(all_w == 0)) if all_w.size else float("nan"),
        seconds=time.perf_counter() - start, config=cfg.to_dict())


@dataclass
class ValidationResult:
    ok: bool
    reason: str
    candidate_score: float
    current_score: float


def _all_finite(agent: TD3Context) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in agent.parameters_snapshot().values())


def bellman_score(agent: TD3Context, batch: Batch) -> float:
    """Minus the mean squared one-step Bellman residual of the agent's own critic and actor on `batch`:
    Q1(s, a, z) - (r + gamma * not_done * Q1(s', mu(s', z'), z')), no target networks, no noise.

    Why this score: it needs only logged new-task transitions (no extra robot episodes, no second model
    to fit), it is deterministic, and it is exactly what adaptation is meant to improve, the critic's
    consistency with the new task's rewards and dynamics under the policy it would deploy. An update that
    diverged (exploding Q or a broken actor) makes it much worse.
    """
    critic, actor = agent.nets["critic"], agent.nets["actor"]
    with torch.no_grad():
        z_c = zn_c = None
        if agent.cfg.use_context:
            z_c = agent.nets["critic_encoder"](batch.hist, batch.hist_len)
            zn_c = agent.nets["critic_encoder"](batch.next_hist, batch.next_hist_len)
        zn_a = agent.contexts(batch.next_hist, batch.next_hist_len) if agent.cfg.use_context else None
        q = critic.q1(batch.obs, batch.actions, z_c)
        qn = critic.q1(batch.next_obs, actor(batch.next_obs, zn_a), zn_c)
        residual = q - (batch.rewards + agent.cfg.gamma * batch.not_done * qn)
    return -float(residual.pow(2).mean())


def validate_update(candidate: TD3Context, current: TD3Context, held_out: Sequence[Episode],
                    margin: float) -> ValidationResult:
    """Accept `candidate` only if all its weights are finite and its bellman_score on the held-out
    new-task episodes is not worse than the current policy's by more than `margin` (a fraction of the
    current score's magnitude, so one margin fits tasks with any reward scale)."""
    if not (np.isfinite(margin) and margin >= 0):
        raise InputError(f"validate_update: margin must be a finite number >= 0, got {margin}")
    _check_new_episodes(current, held_out)
    if not _all_finite(candidate):
        return ValidationResult(False, "candidate has non-finite weights", float("nan"), float("nan"))
    batch = episodes_to_batch(held_out, current.cfg.history_len)
    cand, cur = bellman_score(candidate, batch), bellman_score(current, batch)
    if not np.isfinite(cand):
        return ValidationResult(False, "candidate's score on held-out data is not finite", cand, cur)
    if cand < cur - margin * abs(cur):
        return ValidationResult(False, f"candidate's held-out Bellman score {cand:.4g} is worse than the "
                                       f"current {cur:.4g} by more than {margin:g} of it", cand, cur)
    return ValidationResult(True, f"held-out Bellman score {cand:.4g} vs current {cur:.4g}", cand, cur)
