"""What a context entry is, and the context computed one step at a time (deployment, rollouts, nodes).

Entry k = concat(a_k, [r_k], s_k) (MQL order: action, reward, observation). The context at time t is the
GRU's hidden state after reading entries max(0, t-H) .. t-1 from a zero state, so at t = 0 it is zeros.
StreamingContext carries the hidden state (O(1) per step) while t <= H and recomputes its H-entry window
from zero past that, so it always equals the batched encoder of networks.ContextEncoder.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from mql_ros.core.episode import Episode
from mql_ros.core.errors import InputError

if TYPE_CHECKING:
    from mql_ros.core.networks import ContextEncoder


def entry_dim(obs_dim: int, act_dim: int) -> int:
    return act_dim + 1 + obs_dim


def context_entries(episode_or_arrays: Episode | tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """(T, act_dim + 1 + obs_dim) float32 entries of an Episode or of (observations, actions, rewards)
    with T+1 observations (the last one has no entry: nothing was done from it yet)."""
    if isinstance(episode_or_arrays, Episode):
        obs, act, rew = episode_or_arrays.observations, episode_or_arrays.actions, episode_or_arrays.rewards
    else:
        obs, act, rew = (np.asarray(x, dtype=np.float32) for x in episode_or_arrays)
        rew = rew.reshape(-1)
        if obs.ndim != 2 or act.ndim != 2 or obs.shape[0] < act.shape[0] or rew.shape[0] != act.shape[0]:
            raise InputError(f"context_entries: need observations (>=T, obs_dim), actions (T, act_dim) and "
                             f"T rewards, got {obs.shape}, {act.shape}, {rew.shape}")
    t = act.shape[0]
    return np.concatenate([act, rew[:, None], obs[:t]], axis=1).astype(np.float32, copy=False)


def context_input_scale(episodes: list[Episode], floor: float = 0.01) -> np.ndarray:
    """Per-feature 1 / standard deviation of the context entries of `episodes` (networks.ContextEncoder's
    input_scale), the deviation floored at `floor` so a constant feature is not blown up."""
    if not episodes:
        raise InputError("context_input_scale: needs at least one episode")
    entries = np.concatenate([context_entries(e) for e in episodes])
    if not np.all(np.isfinite(entries)):
        raise InputError("context_input_scale: the episodes' entries contain NaN or inf")
    return (1.0 / np.maximum(entries.std(axis=0), floor)).astype(np.float32)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), the exponent capped at 88 (exp(88.8) overflows float32; the result is below 1e-38 there
    anyway): an input like a -3e38 reward warned "overflow encountered in exp". Below the cap it is the same
    computation as always, bit for bit, so training runs repeat the shipped checkpoint's curve."""
    return 1.0 / (1.0 + np.exp(np.minimum(-x, 88.0)))


class StreamingContext:
    """A GRU run one entry at a time in numpy float32, from the weights of a torch nn.GRU (gate order
    r, z, n as in PyTorch)."""

    def __init__(self, weight_ih: np.ndarray, weight_hh: np.ndarray, bias_ih: np.ndarray,
                 bias_hh: np.ndarray, history_len: int, obs_dim: int, act_dim: int):
        self.w_ih = np.ascontiguousarray(weight_ih, dtype=np.float32)
        self.w_hh = np.ascontiguousarray(weight_hh, dtype=np.float32)
        self.b_ih = np.ascontiguousarray(bias_ih, dtype=np.float32)
        self.b_hh = np.ascontiguousarray(bias_hh, dtype=np.float32)
        self.context_dim = self.w_hh.shape[1]
        if self.w_ih.shape != (3 * self.context_dim, entry_dim(obs_dim, act_dim)):
            raise InputError(f"StreamingContext: GRU input weights {self.w_ih.shape} do not fit obs_dim="
                             f"{obs_dim}, act_dim={act_dim} (expected {(3 * self.context_dim,)} x "
                             f"{entry_dim(obs_dim, act_dim)})")
        self.history_len = int(history_len)
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        # Input projections W_ih x + b_ih of the window's entries: what a recompute past H needs.
        self._window: deque[np.ndarray] = deque(maxlen=self.history_len)
        self.reset()

    @classmethod
    def from_encoder(cls, encoder: ContextEncoder, history_len: int, obs_dim: int, act_dim: int) -> StreamingContext:
        """From a networks.ContextEncoder (its GRU, with the input scale folded into the input weights)."""
        def get(name):
            return getattr(encoder.gru, name).detach().cpu().numpy()
        return cls(encoder.input_weights().cpu().numpy(), get("weight_hh_l0"), get("bias_ih_l0"),
                   get("bias_hh_l0"), history_len, obs_dim, act_dim)

    def reset(self) -> None:
        """Start of an episode: empty history, zero context."""
        self._window.clear()
        self.steps = 0
        self.context = np.zeros(self.context_dim, dtype=np.float32)

    def _cell(self, gi: np.ndarray, h: np.ndarray) -> np.ndarray:
        c = self.context_dim
        gh = self.w_hh @ h + self.b_hh
        rz = _sigmoid(gi[: 2 * c] + gh[: 2 * c])
        n = np.tanh(gi[2 * c:] + rz[:c] * gh[2 * c:])
        z = rz[c:]
        return (1.0 - z) * n + z * h

    def push(self, obs: npt.ArrayLike, action: npt.ArrayLike, reward: float) -> np.ndarray:
        """Append the entry (action, reward, obs) of the step just taken (obs is the state the action was
        taken in) and return the new context. Rejects wrong lengths and NaN before changing any state."""
        gi = self._projected(obs, action, reward)
        h = self._next_context(gi)
        self._window.append(gi)
        self.steps += 1
        self.context = h
        return self.context

    def preview(self, obs: npt.ArrayLike, action: npt.ArrayLike, reward: float) -> np.ndarray:
        """The context push(obs, action, reward) would return, changing nothing: for an entry whose reward a
        later message may still replace."""
        return self._next_context(self._projected(obs, action, reward))

    def _projected(self, obs, action, reward) -> np.ndarray:
        """W_ih x + b_ih of a checked entry x = (action, reward, obs)."""
        a = np.asarray(action, dtype=np.float32).reshape(-1)
        s = np.asarray(obs, dtype=np.float32).reshape(-1)
        if a.shape[0] != self.act_dim or s.shape[0] != self.obs_dim:
            raise InputError(f"StreamingContext.push: expected action of {self.act_dim} and obs of "
                             f"{self.obs_dim} values, got {a.shape[0]} and {s.shape[0]}")
        r = np.asarray(reward, dtype=np.float32).reshape(-1)
        if r.shape[0] != 1:
            raise InputError(f"StreamingContext.push: reward must be one value, got {r.shape[0]}")
        x = np.concatenate([a, r, s])
        if not np.all(np.isfinite(x)):
            raise InputError(f"StreamingContext.push: non-finite entry {x.tolist()}")
        return self.w_ih @ x + self.b_ih

    def _next_context(self, gi: np.ndarray) -> np.ndarray:
        """The context once the entry projected to `gi` is appended."""
        if self.steps < self.history_len:
            return self._cell(gi, self.context).astype(np.float32, copy=False)
        # the window slides: its oldest entry leaves, so rerun it from zero (O(H))
        h = np.zeros(self.context_dim, dtype=np.float32)
        for g in islice(self._window, 1, None):
            h = self._cell(g, h)
        return self._cell(gi, h).astype(np.float32, copy=False)
