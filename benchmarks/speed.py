"""Speed of the learning core, each number next to a plain baseline measured in the same run.

1. Meta-training updates/s: TD3Context.update against a plain, straightforward PyTorch TD3+GRU update as
   the authors wrote it: separate nn.GRU encoders for the actor, the critic and both targets, each run
   over the full zero-padded H-step window of every sample; two separate critic MLPs; the actor loss
   backpropagated through the critic and its GRU. Same network sizes, batch size, H and batches.
2. One control step (context push + actor) of runtime.DeployedPolicy against the same step in torch
   (nn.GRUCell + the actor, no_grad), median and p99 latency.

Rounds alternate between the two contenders so machine load hits both alike; the table reports the
median over rounds. `--quick` is a few-second smoke run.

    .venv/bin/python benchmarks/speed.py [--shared-encoder] [--numpy-gru] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mql_ros.core import networks  # noqa: E402
from mql_ros.core.config import MQLConfig  # noqa: E402
from mql_ros.core.context import entry_dim  # noqa: E402
from mql_ros.core.episode import Episode  # noqa: E402
from mql_ros.core.replay import Batch, MultiTaskReplay  # noqa: E402
from mql_ros.core.td3 import TD3Context  # noqa: E402


class PlainTD3GRU:
    """The reference update: what a direct PyTorch transcription of the authors' TD3-context does."""

    def __init__(self, cfg: MQLConfig, obs_dim: int, act_dim: int):
        e, c, hs = entry_dim(obs_dim, act_dim), cfg.context_dim, cfg.hidden_sizes
        self.cfg = cfg

        def mlp(n_in, n_out):
            sizes = [n_in, *hs, n_out]
            layers = []
            for i in range(len(sizes) - 1):
                layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
            return nn.Sequential(*layers[:-1])

        self.actor = nn.ModuleDict({"gru": nn.GRU(e, c, batch_first=True), "mlp": mlp(obs_dim + c, act_dim)})
        self.critic = nn.ModuleDict({"gru": nn.GRU(e, c, batch_first=True),
                                     "q1": mlp(obs_dim + act_dim + c, 1),
                                     "q2": mlp(obs_dim + act_dim + c, 1)})
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.lr)
        self.iterations = 0

    @staticmethod
    def context(gru: nn.GRU, hist: torch.Tensor, hist_len: torch.Tensor) -> torch.Tensor:
        out, _ = gru(hist)
        z = out[torch.arange(hist.shape[0]), (hist_len - 1).clamp(min=0)]
        return z * (hist_len > 0).unsqueeze(1).float()

    def pi(self, net, obs, hist, hist_len):
        return torch.tanh(net["mlp"](torch.cat([obs, self.context(net["gru"], hist, hist_len)], 1)))

    def q(self, net, obs, act, hist, hist_len):
        x = torch.cat([obs, act, self.context(net["gru"], hist, hist_len)], 1)
        return net["q1"](x), net["q2"](x)

    def update(self, b: Batch) -> None:
        cfg = self.cfg
        with torch.no_grad():
            noise = (torch.randn_like(b.actions) * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
            mu = self.pi(self.actor_target, b.next_obs, b.next_hist, b.next_hist_len)
            next_a = (mu + noise).clamp(-1, 1)
            tq1, tq2 = self.q(self.critic_target, b.next_obs, next_a, b.next_hist, b.next_hist_len)
            y = b.rewards + b.not_done * cfg.gamma * torch.min(tq1, tq2)
        q1, q2 = self.q(self.critic, b.obs, b.actions, b.hist, b.hist_len)
        loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        self.critic_opt.zero_grad()
        loss.backward()
        self.critic_opt.step()
        self.iterations += 1
        if self.iterations % cfg.policy_delay == 0:
            a = self.pi(self.actor, b.obs, b.hist, b.hist_len)
            x = torch.cat([b.obs, a, self.context(self.critic["gru"], b.hist, b.hist_len)], 1)
            actor_loss = -self.critic["q1"](x).mean()  # Q1 only, as the authors' actor loss
            self.actor_opt.zero_grad()
            actor_loss.backward()
            self.actor_opt.step()
            for net, target in ((self.actor, self.actor_target), (self.critic, self.critic_target)):
                for p, tp in zip(net.parameters(), target.parameters(), strict=True):
                    tp.data.copy_(cfg.tau * p.data + (1 - cfg.tau) * tp.data)


def make_batches(cfg: MQLConfig, obs_dim: int, act_dim: int, episode_len: int, n: int,
                 seed: int) -> list[Batch]:
    rng = np.random.default_rng(seed)
    store = MultiTaskReplay(cfg.history_len, capacity=200 * episode_len)
    for i in range(200):
        store.add_episode(Episode(f"task/{i % 20}", rng.normal(size=(episode_len + 1, obs_dim)),
                                  rng.uniform(-1, 1, size=(episode_len, act_dim)),
                                  rng.normal(size=episode_len)))
    return [store.sample(cfg.batch_size, rng) for _ in range(n)]


def rate(update, batches: list[Batch], n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        update(batches[i % len(batches)])
    return n / (time.perf_counter() - t0)


def latency(step, n: int, episode_len: int) -> np.ndarray:
    out = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter_ns()
        step(i % episode_len == 0)
        out[i] = time.perf_counter_ns() - t0
    return out / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--obs-dim", type=int, default=14)
    ap.add_argument("--act-dim", type=int, default=5)
    ap.add_argument("--episode-len", type=int, default=50)
    ap.add_argument("--history-len", type=int, default=None, help="default: the config's")
    ap.add_argument("--context-dim", type=int, default=None)
    ap.add_argument("--hidden", type=int, nargs="+", default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--updates", type=int, default=40, help="updates per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20000, help="control steps timed for latency")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shared-encoder", action="store_true", help="time TD3Context with one shared GRU")
    ap.add_argument("--numpy-gru", action="store_true",
                    help="run the GRU's step loops in numpy (what runs where the C kernel did not build)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.updates, args.rounds, args.steps = 6, 2, 2000
    torch.set_num_threads(args.threads)
    if args.numpy_gru:
        networks._gru_kernel = None
    gru_loops = "C kernel" if networks._gru_kernel is not None else "numpy"
    over = {k: v for k, v in (("history_len", args.history_len), ("context_dim", args.context_dim),
                              ("batch_size", args.batch_size)) if v is not None}
    if args.hidden:
        over["hidden_sizes"] = tuple(args.hidden)
    cfg = MQLConfig(**over)
    plain = PlainTD3GRU(cfg, args.obs_dim, args.act_dim)
    if args.shared_encoder:
        cfg = MQLConfig(**over, shared_encoder=True)
    batches = make_batches(cfg, args.obs_dim, args.act_dim, args.episode_len, 8, seed=0)

    ours = TD3Context(cfg, args.obs_dim, args.act_dim)
    ours.update(batches[0])
    plain.update(batches[0])
    r_ours, r_plain = [], []
    for _ in range(args.rounds):
        r_ours.append(rate(ours.update, batches, args.updates))
        r_plain.append(rate(plain.update, batches, args.updates))
    u_ours, u_plain = float(np.median(r_ours)), float(np.median(r_plain))

    from mql_ros.core.checkpoint import save_checkpoint
    from mql_ros.core.runtime import DeployedPolicy

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.pt")
        save_checkpoint(path, ours, "bench")
        policy = DeployedPolicy.from_checkpoint(path)
    rng = np.random.default_rng(1)
    obs = rng.normal(size=(args.episode_len + 1, args.obs_dim)).astype(np.float32)
    acts = rng.uniform(-1, 1, size=(args.episode_len, args.act_dim)).astype(np.float32)
    ctx = policy.new_context()
    state = {"k": 0}

    def numpy_step(new_episode: bool) -> None:
        if new_episode:
            ctx.reset()
            state["k"] = 0
        k = state["k"]
        policy.act(obs[k], ctx.push(obs[k], acts[k], 0.5) if k else ctx.context)
        state["k"] = k + 1

    cell = nn.GRUCell(entry_dim(args.obs_dim, args.act_dim), cfg.context_dim)
    gru = ours.actor_encoder.gru
    cell.load_state_dict({"weight_ih": gru.weight_ih_l0, "weight_hh": gru.weight_hh_l0,
                          "bias_ih": gru.bias_ih_l0, "bias_hh": gru.bias_hh_l0})
    actor = ours.nets["actor"]
    obs_t, acts_t = torch.from_numpy(obs), torch.from_numpy(acts)
    tstate = {"k": 0, "h": torch.zeros(1, cfg.context_dim)}

    @torch.no_grad()
    def torch_step(new_episode: bool) -> None:
        if new_episode:
            tstate["k"], tstate["h"] = 0, torch.zeros(1, cfg.context_dim)
        k = tstate["k"]
        if k:
            entry = torch.cat([acts_t[k], torch.tensor([0.5]), obs_t[k]]).unsqueeze(0)
            tstate["h"] = cell(entry, tstate["h"])
        actor(obs_t[k].unsqueeze(0), tstate["h"])
        tstate["k"] = k + 1

    lat_np = latency(numpy_step, args.steps, args.episode_len)
    lat_t = latency(torch_step, args.steps, args.episode_len)
    res = {"sizes": {"obs_dim": args.obs_dim, "act_dim": args.act_dim, "history_len": cfg.history_len,
                     "context_dim": cfg.context_dim, "hidden": list(cfg.hidden_sizes),
                     "batch_size": cfg.batch_size, "episode_len": args.episode_len, "threads": args.threads,
                     "shared_encoder": cfg.shared_encoder, "gru_step_loops": gru_loops},
           "updates_per_s": {"td3context": u_ours, "plain": u_plain, "ratio": u_ours / u_plain,
                             "rounds_td3context": r_ours, "rounds_plain": r_plain},
           "step_latency_us": {"deployed_median": float(np.median(lat_np)),
                               "deployed_p99": float(np.percentile(lat_np, 99)),
                               "torch_median": float(np.median(lat_t)),
                               "torch_p99": float(np.percentile(lat_t, 99)),
                               "median_ratio": float(np.median(lat_t) / np.median(lat_np))}}
    s = res["sizes"]
    print(f"sizes: obs {s['obs_dim']} act {s['act_dim']} H {s['history_len']} context {s['context_dim']} "
          f"hidden {s['hidden']} batch {s['batch_size']} episode {s['episode_len']} threads {s['threads']} "
          f"shared encoder {s['shared_encoder']} GRU step loops {gru_loops}")
    print(f"{'measure':<34}{'ours':>12}{'baseline':>12}{'ratio':>8}")
    print(f"{'TD3 updates/s (median of rounds)':<34}{u_ours:>12.1f}{u_plain:>12.1f}{u_ours / u_plain:>7.2f}x")
    lt = res["step_latency_us"]
    print(f"{'step latency median (us)':<34}{lt['deployed_median']:>12.1f}{lt['torch_median']:>12.1f}"
          f"{lt['median_ratio']:>7.2f}x")
    print(f"{'step latency p99 (us)':<34}{lt['deployed_p99']:>12.1f}{lt['torch_p99']:>12.1f}")
    print("targets: updates ratio >= 4x; latency median <= 50 us, p99 <= 150 us")
    if args.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
