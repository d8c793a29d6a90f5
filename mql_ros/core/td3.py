"""TD3-context: TD3 whose actor and twin critics also read a GRU context of the recent trajectory.

As in the authors' code, the actor and the critic each own a GRU encoder trained by their own loss, and
each has a polyak-averaged target copy. Separate encoders keep the actor's context (the one deployed and
used as propensity features) free of critic-loss gradients; `shared_encoder` instead trains one GRU by
the critic loss and gives the actor its context detached. The same update serves MQL adaptation: per-
sample weights multiply the critic and actor losses, and a proximal term lambda * ||theta - anchor||^2
keeps the parameters near the meta-trained ones. An optional penalty on the actor's pre-tanh output
(MQLConfig.actor_preactivation_l2) keeps actions from sticking at the tanh limits.

Speed (measured by benchmarks/speed.py against the plain update): all encoders of an update run in one
GRU pass over packed windows (no padding computed; the windows before t and t+1 share their prefix), with
a hand-written backward through time, both step loops in compiled C (networks.encode_windows,
_gru_kernel.c); the twin critics are one batched matmul per layer; the actor step reuses the critic's
context from the critic step (detached, computed with the critic encoder before that step) and computes no
gradients for critic weights; Adam is the fused kernel and the target update one foreach op.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn

from mql_ros.core.config import MQLConfig, check_same_networks
from mql_ros.core.context import StreamingContext, entry_dim
from mql_ros.core.errors import InputError
from mql_ros.core.networks import Actor, ContextEncoder, TwinCritic, encode_windows
from mql_ros.core.replay import Batch

_ACTOR_PARTS = ("actor", "actor_encoder")
_CRITIC_PARTS = ("critic", "critic_encoder")


def build_networks(cfg: MQLConfig, obs_dim: int, act_dim: int) -> nn.ModuleDict:
    """The actor, the twin critic and the context encoder(s) `cfg` asks for, initialized from torch's RNG; on
    the device torch builds on (the meta device, for a checkpoint's shapes without their memory)."""
    context_dim = cfg.context_dim if cfg.use_context else 0
    nets = {"actor": Actor(obs_dim, context_dim, act_dim, cfg.hidden_sizes),
            "critic": TwinCritic(obs_dim, act_dim, context_dim, cfg.hidden_sizes)}
    if cfg.use_context:
        nets["critic_encoder"] = ContextEncoder(entry_dim(obs_dim, act_dim), cfg.context_dim)
        if not cfg.shared_encoder:
            nets["actor_encoder"] = ContextEncoder(entry_dim(obs_dim, act_dim), cfg.context_dim)
    return nn.ModuleDict(nets)


class TD3Context:
    """The agent: networks, targets, optimizers and the (weighted, proximal) TD3 update."""

    def __init__(self, cfg: MQLConfig, obs_dim: int, act_dim: int, seed: int = 0):
        if obs_dim < 1 or act_dim < 1:
            raise InputError(f"TD3Context: obs_dim and act_dim must be >= 1, got {obs_dim}, {act_dim}")
        self.cfg = cfg
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.context_dim = cfg.context_dim if cfg.use_context else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.nets = build_networks(cfg, self.obs_dim, self.act_dim)
        self.targets = copy.deepcopy(self.nets).requires_grad_(False)
        self._noise = torch.Generator().manual_seed(seed + 1)
        self.updates = 0  # critic steps taken; the actor and targets move every policy_delay of them
        self.reset_optimizers(cfg.lr)

    # ---- parameters -------------------------------------------------------------------------------
    def _group(self, parts: tuple[str, ...]) -> list[tuple[str, nn.Parameter]]:
        return [(f"{p}.{n}", t) for p in parts if p in self.nets for n, t in self.nets[p].named_parameters()]

    def reset_optimizers(self, lr: float) -> None:
        """Fresh Adam states (adaptation starts from them at its own lr)."""
        self.actor_opt = torch.optim.Adam([t for _, t in self._group(_ACTOR_PARTS)], lr=lr, fused=True)
        self.critic_opt = torch.optim.Adam([t for _, t in self._group(_CRITIC_PARTS)], lr=lr, fused=True)

    def continue_with(self, cfg: MQLConfig) -> None:
        """Go on training these networks under `cfg` (same shape, e.g. a lower lr and noise for a final
        phase), with fresh optimizers at cfg.lr."""
        check_same_networks(self.cfg, cfg)
        self.cfg = cfg
        self.reset_optimizers(cfg.lr)

    def parameters_snapshot(self) -> dict[str, Tensor]:
        """Detached copies of all trainable parameters: the anchor of the proximal term."""
        return {n: t.detach().clone() for n, t in self._group(_ACTOR_PARTS + _CRITIC_PARTS)}

    def snapshot(self) -> dict:
        """Everything needed to roll back after adapting to a task: nets, targets, optimizers, counters."""
        return copy.deepcopy(self.state_dict())

    def restore(self, snap: dict) -> None:
        self.load_state_dict(copy.deepcopy(snap))

    def state_dict(self) -> dict:
        return {"nets": self.nets.state_dict(), "targets": self.targets.state_dict(),
                "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
                "updates": self.updates, "noise_rng": self._noise.get_state()}

    def load_state_dict(self, d: dict) -> None:
        self.nets.load_state_dict(d["nets"])
        self.targets.load_state_dict(d["targets"])
        self.actor_opt.load_state_dict(d["actor_opt"])
        self.critic_opt.load_state_dict(d["critic_opt"])
        self.updates = int(d["updates"])
        if "noise_rng" in d:  # not a weight: states saved without it keep the current stream
            self._noise.set_state(d["noise_rng"])

    @property
    def actor_encoder(self) -> ContextEncoder | None:
        """The GRU whose context the actor reads (the critic's, with a shared encoder)."""
        if not self.cfg.use_context:
            return None
        return self.nets["critic_encoder" if self.cfg.shared_encoder else "actor_encoder"]

    # ---- acting -----------------------------------------------------------------------------------
    def contexts(self, hist: Tensor, hist_len: Tensor) -> Tensor:
        """The actor's context for each window, (B, context_dim), without gradients."""
        if not self.cfg.use_context:
            return hist.new_zeros(hist.shape[0], 0)
        with torch.no_grad():
            return self.actor_encoder(hist, hist_len)

    def streaming_context(self) -> StreamingContext:
        """A one-step-at-a-time context with this agent's current actor encoder (for rollouts)."""
        if not self.cfg.use_context:
            e = entry_dim(self.obs_dim, self.act_dim)
            return StreamingContext(np.zeros((0, e)), np.zeros((0, 0)), np.zeros(0), np.zeros(0),
                                    self.cfg.history_len, self.obs_dim, self.act_dim)
        return StreamingContext.from_encoder(self.actor_encoder, self.cfg.history_len, self.obs_dim, self.act_dim)

    def set_context_input_scale(self, scale: np.ndarray) -> None:
        """The per-feature scale every context encoder (targets included) applies to its entries; fixed
        once before learning starts (networks.ContextEncoder, context.context_input_scale)."""
        if not self.cfg.use_context:
            return
        s = self._checked_input_scale(scale, "set_context_input_scale")
        for nets in (self.nets, self.targets):
            for name in ("critic_encoder", "actor_encoder"):
                if name in nets:
                    nets[name].input_scale.copy_(s)

    def check_context_input_scales(self) -> None:
        """InputError naming the first encoder whose input_scale is not finite and positive: loaded weights
        (e.g. an edited checkpoint) are not checked by set_context_input_scale."""
        for part, nets in (("nets", self.nets), ("targets", self.targets)):
            for name in ("critic_encoder", "actor_encoder"):
                if name in nets:
                    self._checked_input_scale(nets[name].input_scale, f"{part} {name}.input_scale")

    def _checked_input_scale(self, scale, what: str) -> Tensor:
        s = torch.as_tensor(np.asarray(scale, dtype=np.float32).reshape(-1))
        e = entry_dim(self.obs_dim, self.act_dim)
        if s.shape[0] != e or not torch.isfinite(s).all() or not (s > 0).all():
            values = ", ".join(f"{v:.4g}" for v in s.tolist())
            raise InputError(f"{what}: need {e} finite positive values, got [{values}]")
        return s

    def act(self, obs: np.ndarray, context: np.ndarray, noise: float = 0.0,
            rng: np.random.Generator | None = None) -> np.ndarray:
        """mu(s, z) plus optional Gaussian exploration noise, clipped to [-1, 1]."""
        s = np.asarray(obs, dtype=np.float32).reshape(-1)
        z = np.asarray(context, dtype=np.float32).reshape(-1)
        if s.shape[0] != self.obs_dim or z.shape[0] != self.context_dim:
            raise InputError(f"act: expected obs of {self.obs_dim} and context of {self.context_dim} values, "
                             f"got {s.shape[0]} and {z.shape[0]}")
        if not (np.all(np.isfinite(s)) and np.all(np.isfinite(z))):
            raise InputError("act: obs or context contains NaN or inf")
        with torch.no_grad():
            ctx = torch.from_numpy(z)[None] if self.context_dim else None
            a = self.nets["actor"](torch.from_numpy(s)[None], ctx)[0].numpy()
        if noise > 0:
            rng = rng if rng is not None else np.random.default_rng()
            a = np.clip(a + rng.normal(0.0, noise, size=a.shape), -1.0, 1.0).astype(np.float32)
        return a

    # ---- learning ---------------------------------------------------------------------------------
    def _proximal(self, parts: tuple[str, ...], anchor: dict[str, Tensor]) -> Tensor:
        params = self._group(parts)
        missing = [n for n, _ in params if n not in anchor]
        if missing:
            raise InputError(f"update: the anchor lacks parameters {missing[:3]}...")
        diffs = torch._foreach_sub([t for _, t in params], [anchor[n] for n, _ in params])
        return sum((d * d).sum() for d in diffs)

    def smoothed_target_action(self, next_obs: Tensor, target_context: Tensor | None) -> Tensor:
        """Target policy smoothing: mu'(s', z') plus clipped Gaussian noise, kept in [-1, 1]."""
        cfg = self.cfg
        with torch.no_grad():
            mu = self.targets["actor"](next_obs, target_context)
            noise = torch.randn(mu.shape, generator=self._noise) * cfg.policy_noise
            return (mu + noise.clamp(-cfg.noise_clip, cfg.noise_clip)).clamp(-1.0, 1.0)

    def update(self, batch: Batch, weights: Tensor | None = None, proximal_lambda: float = 0.0,
               anchor: dict[str, Tensor] | None = None) -> dict[str, float]:
        """One TD3 iteration: a critic step, and every policy_delay-th call an actor step and target move.

        `weights` (B,) multiply each sample's critic and actor loss (a zero weight removes the sample);
        with `proximal_lambda` > 0 the loss adds lambda * sum ||theta - anchor||^2 over the parameters the
        step updates (actor and its GRU, or critics and their GRU).
        """
        cfg = self.cfg
        n = len(batch)
        w = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1, 1)
            if w.shape[0] != n or not torch.isfinite(w).all():
                raise InputError(f"update: weights must be {n} finite values, got shape {tuple(w.shape)}")
        prox = proximal_lambda > 0.0
        if prox and anchor is None:
            raise InputError("update: proximal_lambda > 0 needs an anchor (parameters_snapshot())")
        use_ctx = cfg.use_context
        nets, targets = self.nets, self.targets

        actor_step = (self.updates + 1) % cfg.policy_delay == 0
        z_c = z_a = zt_c = zt_a = None
        if use_ctx:  # one GRU pass for all encoders where windows allow (networks.encode_windows)
            now, nxt = [nets["critic_encoder"]], [targets["critic_encoder"]]
            if not cfg.shared_encoder:
                nxt.append(targets["actor_encoder"])
                if actor_step:
                    now.append(nets["actor_encoder"])
            ctx_now, ctx_nxt = encode_windows(now, nxt, batch.hist, batch.hist_len, batch.next_hist,
                                              batch.next_hist_len)
            z_c, zt_c = ctx_now[0], ctx_nxt[0]
            zt_a = zt_c if cfg.shared_encoder else ctx_nxt[1]
            if actor_step:  # a shared encoder is trained by the critic loss only; the actor reads it detached
                z_a = z_c.detach() if cfg.shared_encoder else ctx_now[1]
        with torch.no_grad():
            next_a = self.smoothed_target_action(batch.next_obs, zt_a)
            tq1, tq2 = targets["critic"](batch.next_obs, next_a, zt_c)
            y = batch.rewards + batch.not_done * cfg.gamma * torch.min(tq1, tq2)

        q1, q2 = nets["critic"](batch.obs, batch.actions, z_c)
        td = (q1 - y).pow(2) + (q2 - y).pow(2)
        critic_loss = (td * w).mean() if w is not None else td.mean()
        total = critic_loss + proximal_lambda * self._proximal(_CRITIC_PARTS, anchor) if prox else critic_loss
        self.critic_opt.zero_grad(set_to_none=True)
        total.backward()
        self.critic_opt.step()
        self.updates += 1
        info = {"critic_loss": float(critic_loss.detach()), "q1": float(q1.detach().mean())}
        if not actor_step:
            return info

        nets["critic"].requires_grad_(False)
        try:
            pre = nets["actor"].preactivation(batch.obs, z_a)
            q = nets["critic"].q1(batch.obs, torch.tanh(pre), z_c.detach() if z_c is not None else None)
        finally:
            nets["critic"].requires_grad_(True)
        per_sample = -q
        if cfg.actor_preactivation_l2 > 0:
            per_sample = per_sample + cfg.actor_preactivation_l2 * pre.pow(2).sum(dim=1, keepdim=True)
        actor_loss = (per_sample * w).mean() if w is not None else per_sample.mean()
        total = actor_loss + proximal_lambda * self._proximal(_ACTOR_PARTS, anchor) if prox else actor_loss
        self.actor_opt.zero_grad(set_to_none=True)
        total.backward()
        self.actor_opt.step()
        with torch.no_grad():
            target_params = list(self.targets.parameters())
            torch._foreach_lerp_(target_params, list(self.nets.parameters()), cfg.tau)
        info["actor_loss"] = float(actor_loss.detach())
        return info
