"""What the adaptation benchmarks share: the checkpoint to adapt and its adapt: settings with --adapt-set
overrides, so that every adaptation benchmark takes the same options and checks them the same way."""

from __future__ import annotations

import argparse

import torch

from mql_ros.core.checkpoint import Checkpoint, agent_from_checkpoint, load_checkpoint
from mql_ros.core.config import AdaptConfig
from mql_ros.core.errors import ConfigError
from mql_ros.core.paths import share_file
from mql_ros.core.td3 import TD3Context


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, help="default: the shipped checkpoints/arm_reach.pt")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adapt-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override the checkpoint's stored adapt: settings, e.g. archive_iters=400")
    parser.add_argument("--json", action="store_true")


def load(args: argparse.Namespace, parser: argparse.ArgumentParser
         ) -> tuple[str, Checkpoint, TD3Context, AdaptConfig]:
    """The checkpoint's path, the checkpoint, an agent holding its weights and the adaptation settings to
    use; a bad --adapt-set exits 2 naming the item before any work is done."""
    torch.set_num_threads(args.threads)
    path = args.checkpoint or str(share_file("checkpoints/arm_reach.pt"))
    ckpt = load_checkpoint(path)
    agent = agent_from_checkpoint(ckpt)
    try:
        cfg = agent.cfg.adapt.with_overrides(args.adapt_set)
    except ConfigError as exc:
        parser.error(f"--adapt-set: {exc}")
    return path, ckpt, agent, cfg
