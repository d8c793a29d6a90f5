"""The three networks of TD3-context: the GRU context encoder, the actor mu(s, z) and twin critics Q(s, a, z).

With `context_dim == 0` the networks take no context at all (plain multi-task TD3, the paper's ablation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

try:  # the GRU's step loops compiled (setup.py builds it where a C compiler is available)
    from mql_ros.core import _gru_kernel
except ImportError:  # the same loops in numpy, slower
    _gru_kernel = None


@dataclass
class PackedWindows:
    """Windows sorted by length (longest first) and packed step by step, like cuDNN's packed sequences.

    At step t only the rows whose window is longer than t are live, and after sorting they are the first
    counts[t] rows, so each step works on a contiguous prefix and no padding is ever computed. Packing
    once lets several encoders (actor and critic) share it.
    """

    order: Tensor  # sorted position -> original row
    counts: list[int]  # live rows at each step
    offsets: list[int]  # where step t's rows start in the packed arrays
    x: Tensor  # (sum(counts), E) the real entries, step-major
    batch: int

    @classmethod
    def of(cls, hist: Tensor, hist_len: Tensor) -> PackedWindows:
        lengths = hist_len.long()
        order = torch.argsort(lengths, descending=True, stable=True)
        longest = int(lengths.max()) if lengths.numel() else 0
        counts = torch.bincount(lengths, minlength=longest + 1).flip(0).cumsum(0).flip(0)[1:].tolist()
        offsets = list(accumulate(counts[:-1], initial=0)) if counts else []
        steps = hist[order, :longest].transpose(0, 1)  # (L, B, E)
        live = torch.arange(hist.shape[0]).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
        return cls(order, counts, offsets, steps[live].detach().contiguous(), int(hist.shape[0]))


def _int64(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def _sigmoid_(a: np.ndarray) -> np.ndarray:
    """In-place logistic via tanh (one transcendental call, exact to rounding)."""
    a *= 0.5
    np.tanh(a, out=a)
    a *= 0.5
    a += 0.5
    return a


@dataclass
class _Run:
    """K GRUs run over the same packed windows, with what their backward passes need (numpy, K first)."""

    packed: PackedWindows
    input_scale: Tensor  # (K, E) each encoder's input_scale (its W_ih gradient is taken in scaled units)
    final: Tensor  # (K, C, B) state after each row's last entry, sorted order
    prev: np.ndarray  # (K, C, T) state entering each packed step
    rz: np.ndarray  # (K, 2C, T) the r and z gates
    new: np.ndarray  # (K, C, T) the candidate n
    ghn: np.ndarray  # (K, C, T) W_hn h + b_hn


def _stack(encoders: list[ContextEncoder]) -> list[Tensor]:
    """(input weights on raw entries, W_hh, b_ih, b_hh), each stacked over the encoders."""
    names = ("weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
    return [torch.stack([e.input_weights() for e in encoders])] + [
        torch.stack([getattr(e.gru, n).detach() for e in encoders]) for n in names]


def _run(p: PackedWindows, encoders: list[ContextEncoder]) -> _Run:
    """Forward of K GRUs over packed windows, without autograd.

    Feature-major layout (K, C, rows): a step's live rows are long contiguous runs. The step loop, input
    projections included, is the compiled kernel for float32 where it was built; otherwise the projections
    of all steps are one torch matmul and the loop is numpy (float64, used by the gradient checks, always).
    """
    w_ih, w_hh, b_ih, b_hh = _stack(encoders)
    k, c, (total, e) = w_hh.shape[0], w_hh.shape[2], p.x.shape
    h_t = p.x.new_zeros(k, c, p.batch)
    h = h_t.numpy()
    prev = np.empty((k, c, total), dtype=h.dtype)
    rz = np.empty((k, 2 * c, total), dtype=h.dtype)
    new = np.empty((k, c, total), dtype=h.dtype)
    ghn = np.empty((k, c, total), dtype=h.dtype)
    if _gru_kernel is not None and h.dtype == np.float32 and w_ih.dtype == torch.float32:
        xt = np.ascontiguousarray(p.x.t().numpy())  # (E, total): the kernel projects each step's inputs itself
        _gru_kernel.gru_forward(k, c, e, total, p.batch, len(p.counts), xt, w_ih.numpy(), b_ih.numpy(),
                                w_hh.numpy(), b_hh.numpy(), _int64(p.counts), _int64(p.offsets), h, prev, rz, new,
                                ghn)
    else:
        gi = torch.addmm(b_ih.reshape(-1, 1), w_ih.reshape(-1, e), p.x.t())  # all steps' inputs at once
        _forward_steps_numpy(p, gi.view(k, 3 * c, total).numpy(), w_hh, b_hh, h, prev, rz, new, ghn)
    return _Run(p, torch.stack([e.input_scale for e in encoders]), h_t, prev, rz, new, ghn)


def _forward_steps_numpy(p: PackedWindows, gi: np.ndarray, w_hh: Tensor, b_hh: Tensor, h: np.ndarray,
                         prev: np.ndarray, rz: np.ndarray, new: np.ndarray, ghn: np.ndarray) -> None:
    """The step loop of _run: matmuls in torch, the element-wise work one numpy call for all K encoders
    on views of the same memory (numpy's per-call cost is a fraction of torch's at these sizes)."""
    k, c = h.shape[0], h.shape[1]
    prev_t, b_hh = torch.from_numpy(prev), b_hh.unsqueeze(2)
    g_t = torch.empty(k, 3 * c, max(p.counts, default=0), dtype=prev_t.dtype)
    for off, n in zip(p.offsets, p.counts, strict=True):
        sl = slice(off, off + n)
        hp, hn, s, nn_ = prev[:, :, sl], h[:, :, :n], rz[:, :, sl], new[:, :, sl]
        np.copyto(hp, hn)
        for j in range(k):  # a strided (C, n) operand is fine for addmm, not for a batched matmul
            torch.addmm(b_hh[j], w_hh[j], prev_t[j, :, sl], out=g_t[j, :, :n])
        g = g_t.numpy()[:, :, :n]  # (K, 3C, n)
        np.add(gi[:, : 2 * c, sl], g[:, : 2 * c], out=s)
        _sigmoid_(s)
        np.copyto(ghn[:, :, sl], g[:, 2 * c:])
        np.multiply(s[:, :c], g[:, 2 * c:], out=nn_)
        nn_ += gi[:, 2 * c:, sl]
        np.tanh(nn_, out=nn_)
        np.subtract(hp, nn_, out=hn)  # h' = n + z * (h - n)
        hn *= s[:, c:]
        hn += nn_


def _backward(run: _Run, k: int, shifted: bool, w_hh: Tensor, grad: Tensor) -> tuple[Tensor, ...]:
    """Backward through time of encoder k of `run`, for `grad` (B, C) on each row's context: the state
    after all its entries, or with `shifted` the state one entry before that (see encode_windows)."""
    p = run.packed
    prev, rz, new, ghn = run.prev[k], run.rz[k], run.new[k], run.ghn[k]
    c, total = prev.shape
    counts = p.counts[1:] if shifted else p.counts  # rows whose context reads step t
    dh = np.ascontiguousarray(grad.t().numpy())  # (C, B)
    d_gi_t = torch.zeros(3 * c, total, dtype=grad.dtype)
    d_gh_t = torch.zeros(3 * c, total, dtype=grad.dtype)
    d_gi, d_gh = d_gi_t.numpy(), d_gh_t.numpy()
    if _gru_kernel is not None and dh.dtype == np.float32:
        _gru_kernel.gru_backward(c, total, p.batch, len(counts), np.ascontiguousarray(w_hh.t().numpy()),
                                 _int64(counts), _int64(p.offsets[: len(counts)]), prev, rz, new, ghn, dh,
                                 d_gi, d_gh)
    else:
        _backward_steps_numpy(counts, p.offsets, w_hh, prev, rz, new, ghn, dh, d_gi, d_gh)
    d_w_hh = torch.mm(torch.from_numpy(prev), d_gh_t.t()).t()  # this order runs faster in MKL than d_gh prev^T
    return (d_gi_t @ p.x) * run.input_scale[k], d_w_hh.contiguous(), d_gi_t.sum(1), d_gh_t.sum(1)


def _backward_steps_numpy(counts: list[int], offsets: list[int], w_hh: Tensor, prev: np.ndarray,
                          rz: np.ndarray, new: np.ndarray, ghn: np.ndarray, dh: np.ndarray, d_gi: np.ndarray,
                          d_gh: np.ndarray) -> None:
    """The step loop of _backward: fills d_gi and d_gh (3C, total), consuming dh (C, B)."""
    c = prev.shape[0]
    w_hh_t, d_gh_t = w_hh.t(), torch.from_numpy(d_gh)
    for t in range(len(counts) - 1, -1, -1):
        n = counts[t]
        sl = slice(offsets[t], offsets[t] + n)
        d, r, z, nn_ = dh[:, :n], rz[:c, sl], rz[c:, sl], new[:, sl]
        dn, dr, dz = d_gi[2 * c:, sl], d_gi[:c, sl], d_gi[c: 2 * c, sl]
        np.multiply(nn_, nn_, out=dn)  # dn = d (1 - z) (1 - n^2)
        np.subtract(1.0, dn, out=dn)
        dn *= d
        dn -= dn * z
        np.multiply(dn, ghn[:, sl], out=dr)  # dr = dn ghn r (1 - r)
        dr *= r
        dr -= dr * r
        np.subtract(prev[:, sl], nn_, out=dz)  # dz = d (h - n) z (1 - z)
        dz *= d
        dz *= z
        dz -= dz * z
        d_gh[: 2 * c, sl] = d_gi[: 2 * c, sl]
        np.multiply(dn, r, out=d_gh[2 * c:, sl])
        step = torch.mm(w_hh_t, d_gh_t[:, sl]).numpy()
        d *= z
        d += step


class _Attach(torch.autograd.Function):
    """Gives the context of encoder k of a finished run its gradient path to that encoder's weights, with
    a hand-written backward through time (PyTorch's CPU nn.GRU records every per-step op instead)."""

    @staticmethod
    def forward(ctx, run, k, shifted, context, w_ih, w_hh, b_ih, b_hh):
        ctx.run, ctx.k, ctx.shifted, ctx.w_hh = run, k, shifted, w_hh.detach()
        return context.clone()

    @staticmethod
    def backward(ctx, grad):
        return (None, None, None, None, *_backward(ctx.run, ctx.k, ctx.shifted, ctx.w_hh,
                                                         grad.contiguous()))


def _unsort(h: Tensor, p: PackedWindows) -> Tensor:
    """Rows in sorted order -> original row order."""
    out = torch.empty_like(h)
    out[p.order] = h
    return out


class ContextEncoder(nn.Module):
    """One-layer GRU over a left-aligned, zero-padded window; the context is the hidden state after the
    window's last real entry (zeros for an empty window, as the GRU starts from zero each episode).

    The weights live in an nn.GRU (PyTorch's layout and gate order, so any GRU code can read them); the
    computation is `encode_windows`, which runs several encoders in one pass.
    """

    def __init__(self, entry_dim: int, context_dim: int):
        super().__init__()
        self.gru = nn.GRU(entry_dim, context_dim, batch_first=True)
        self.context_dim = context_dim
        # Each entry is multiplied by input_scale before the GRU. Meta-training sets it once, from the
        # warm-up data (TD3Context.set_context_input_scale), so that reward, positions and velocities reach
        # the GRU at similar magnitudes: Adam moves every input weight by similar steps, so unscaled joint
        # velocities (std ~5 rad/s) would drown the reward (std ~0.1), the only signal of the task.
        self.register_buffer("input_scale", torch.ones(entry_dim))

    def input_weights(self) -> Tensor:
        """W_ih acting on raw (unscaled) entries: what one-step deployment multiplies entries by."""
        return self.gru.weight_ih_l0.detach() * self.input_scale

    def forward(self, hist: Tensor, hist_len: Tensor) -> Tensor:
        return encode_windows([self], [], hist, hist_len)[0][0]


def _with_grad(run: _Run, k: int, shifted: bool, context: Tensor, encoder: ContextEncoder) -> Tensor:
    g = encoder.gru
    weights = (g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0)
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return _Attach.apply(run, k, shifted, context, *weights)
    return context


def encode_windows(now: list[ContextEncoder], nxt: list[ContextEncoder], hist: Tensor, hist_len: Tensor,
                   next_hist: Tensor | None = None, next_hist_len: Tensor | None = None
                   ) -> tuple[list[Tensor], list[Tensor]]:
    """Contexts (B, C) of the `now` encoders for the windows before step t, and of the `nxt` encoders
    (without gradients) for the windows before t+1, in as few GRU passes as possible.

    While t < H the window before t+1 is the window before t plus one entry, so a single pass over the
    t+1 windows gives both: the t context is the state one entry before the end. `now` encoders get a
    gradient path to their weights when grad mode is on.
    """
    shifted = (nxt and next_hist is not None and hist.shape[1] == next_hist.shape[1]
               and bool(torch.equal(next_hist_len, hist_len + 1)))
    if shifted:
        p = PackedWindows.of(next_hist, next_hist_len)
        run = _run(p, now + nxt)
        # the state entering step len (zeros at step 0) of each row, sorted order
        idx = torch.tensor(p.offsets)[hist_len.long()[p.order]] + torch.arange(p.batch)
        prev = torch.from_numpy(run.prev)
        out_now = [_unsort(_with_grad(run, k, True, prev[k][:, idx].t(), e), p) for k, e in enumerate(now)]
        out_nxt = [_unsort(run.final[len(now) + k].t(), p) for k in range(len(nxt))]
        return out_now, out_nxt
    out_now, out_nxt = [], []
    if now:
        p = PackedWindows.of(hist, hist_len)
        run = _run(p, now)
        out_now = [_unsort(_with_grad(run, k, False, run.final[k].t(), e), p) for k, e in enumerate(now)]
    if nxt:
        p = PackedWindows.of(next_hist, next_hist_len)
        run = _run(p, nxt)
        out_nxt = [_unsort(run.final[k].t(), p) for k in range(len(nxt))]
    return out_now, out_nxt


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Deterministic policy mu(s, z) with a tanh output, so actions are in [-1, 1]."""

    def __init__(self, obs_dim: int, context_dim: int, act_dim: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        self.net = _mlp([obs_dim + context_dim, *hidden_sizes, act_dim])

    def forward(self, obs: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.tanh(self.preactivation(obs, context))

    def preactivation(self, obs: Tensor, context: Tensor | None = None) -> Tensor:
        """The action before the tanh: what the pre-activation penalty (MQLConfig) keeps from saturating."""
        x = obs if context is None else torch.cat([obs, context], dim=1)
        return self.net(x)


class TwinCritic(nn.Module):
    """Q1 and Q2 in one module whose layers hold both critics' weights stacked, (2, out, in), so both run
    as one batched matmul per layer. Initialised like nn.Linear (uniform +-1/sqrt(fan_in))."""

    def __init__(self, obs_dim: int, act_dim: int, context_dim: int, hidden_sizes: tuple[int, ...]):
        super().__init__()
        sizes = [obs_dim + act_dim + context_dim, *hidden_sizes, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(2, fan_out, fan_in).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, fan_out).uniform_(-bound, bound)))

    @staticmethod
    def _input(obs: Tensor, act: Tensor, context: Tensor | None) -> Tensor:
        parts = [obs, act] if context is None else [obs, act, context]
        return torch.cat(parts, dim=1)

    def forward(self, obs: Tensor, act: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(Q1, Q2), each (B, 1)."""
        h = self._input(obs, act, context).unsqueeze(0).expand(2, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, F.relu(h) if i else h, w.transpose(1, 2))
        return h[0], h[1]

    def q1(self, obs: Tensor, act: Tensor, context: Tensor | None = None) -> Tensor:
        """Q1 alone (the actor's objective), half the work of forward."""
        h = self._input(obs, act, context)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = F.linear(h, w[0], b[0, 0])
            if i < last:
                h = F.relu(h)
        return h
