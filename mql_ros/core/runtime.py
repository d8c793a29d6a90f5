"""DeployedPolicy: the checkpoint's actor and context encoder in plain numpy for the control loop.

A control tick must not pay torch's per-call overhead (tens of microseconds) or allocate autograd state:
one context push plus one actor evaluation is a handful of small float32 matrix-vector products.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mql_ros.core.checkpoint import Checkpoint, agent_from_checkpoint, load_checkpoint
from mql_ros.core.context import StreamingContext
from mql_ros.core.errors import InputError
from mql_ros.core.robot import RobotSpec


class DeployedPolicy:
    """Deterministic mu(s, z) from a validated checkpoint; actions in [-1, 1]."""

    def __init__(self, checkpoint: Checkpoint):
        agent = agent_from_checkpoint(checkpoint)
        self.checkpoint = checkpoint
        self.sha256 = checkpoint.sha256
        self.obs_dim, self.act_dim = checkpoint.obs_dim, checkpoint.act_dim
        self.context_dim = agent.context_dim
        self._context_template = agent.streaming_context()
        linears = [m for m in agent.nets["actor"].net if hasattr(m, "weight")]
        w0 = linears[0].weight.detach().numpy().astype(np.float32)
        # The first layer is split so act() needs no concatenation of obs and context.
        self._w_obs = np.ascontiguousarray(w0[:, : self.obs_dim])
        self._w_ctx = np.ascontiguousarray(w0[:, self.obs_dim:])
        self._b0 = linears[0].bias.detach().numpy().astype(np.float32)
        self._layers = [(np.ascontiguousarray(m.weight.detach().numpy(), dtype=np.float32),
                         m.bias.detach().numpy().astype(np.float32)) for m in linears[1:]]

    @classmethod
    def from_checkpoint(cls, path: str | Path, expect_robot: RobotSpec | None = None) -> DeployedPolicy:
        """Load and validate (CheckpointError on any mismatch with `expect_robot`)."""
        expect = {} if expect_robot is None else {"expect_obs_dim": expect_robot.obs_dim,
                                                  "expect_act_dim": expect_robot.act_dim}
        return cls(load_checkpoint(path, expect_robot=expect_robot, **expect))

    def new_context(self) -> StreamingContext:
        """A fresh (zero) streaming context with this checkpoint's encoder."""
        t = self._context_template
        return StreamingContext(t.w_ih, t.w_hh, t.b_ih, t.b_hh, t.history_len, t.obs_dim, t.act_dim)

    def act(self, obs: np.ndarray, context: np.ndarray) -> np.ndarray:
        """mu(obs, context) as float32; wrong lengths or NaN/inf inputs raise InputError."""
        s = np.asarray(obs, dtype=np.float32).reshape(-1)
        z = np.asarray(context, dtype=np.float32).reshape(-1)
        if s.shape[0] != self.obs_dim or z.shape[0] != self.context_dim:
            raise InputError(f"policy: expected obs of {self.obs_dim} and context of {self.context_dim} "
                             f"values, "
                             f"got {s.shape[0]} and {z.shape[0]}")
        h = self._w_obs @ s + self._b0
        if self.context_dim:
            h += self._w_ctx @ z
        if not np.all(np.isfinite(h)):
            raise InputError("policy: obs or context contains NaN or inf")
        for w, b in self._layers:
            np.maximum(h, 0.0, out=h)
            h = w @ h + b
        return np.tanh(h)
