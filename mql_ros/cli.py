"""`mql-ros`: meta-train, evaluate, adapt, inspect archives and run the demo (../shared/INTERFACES.md).

Exit status: 0 on success, 2 for bad arguments or input (one-line reason on stderr), 1 for anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mql_ros.core.errors import MQLError

SPLITS = ("train", "test", "ood")
MAX_THREADS = 256  # torch segfaulted at exit from 32768 threads; no machine this runs on has more cores
MAX_NEW_STEPS = 10_000_000  # new-task transitions: a run of 1e22 would never end (one episode is 50-200)


def _family_arg(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--family", required=required,
                        help="built-in family (arm_reach, arm_payload, point_goal) or package.module:attribute")


def _adapt_set_arg(parser: argparse.ArgumentParser) -> None:
    # extend: a repeated --adapt-set adds its items (the default `store` kept only the last occurrence)
    parser.add_argument("--adapt-set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override the checkpoint's stored adapt: settings, e.g. archive_iters=400 proximal=ess")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mql-ros", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="meta-train TD3-context on a task family's train tasks")
    _family_arg(p, required=True)
    p.add_argument("--steps", type=int, required=True, help="environment steps")
    p.add_argument("--out", required=True, help="checkpoint file to write (a learning-curve PNG goes beside it)")
    p.add_argument("--archive", help="also record every episode into this rosbag2 archive directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="YAML with MQLConfig keys (e.g. config/arm_reach_train.yaml); with --init, "
                   "the keys that change the checkpoint's config (e.g. config/arm_reach_final.yaml)")
    p.add_argument("--init", metavar="CKPT", help="go on training this checkpoint's agent (same family, same "
                   "network shape) instead of a fresh one; the replay starts empty")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("eval", help="zero-shot (and, with --adapt, MQL-adapted) returns on a split")
    p.add_argument("--checkpoint", required=True)
    _family_arg(p, required=False)
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--episodes", type=int, default=3, help="evaluation episodes per task")
    p.add_argument("--tasks", type=int, default=0, help="evaluate only the first N tasks of the split (0: all)")
    p.add_argument("--adapt", action="store_true", help="also adapt to each task with MQL and evaluate")
    p.add_argument("--finetune", action="store_true", help="also evaluate naive fine-tuning on the same data")
    p.add_argument("--new-steps", type=int, default=0, help="new-task transitions to collect (0: one episode)")
    _adapt_set_arg(p)
    p.add_argument("--archive", help="archive of meta-training data (default: a snapshot rolled out anew)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    p = sub.add_parser("adapt", help="adapt a checkpoint to a new task and write the adapted checkpoint")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--archive", help="archive directory of the meta-training data (default: per-task snapshots "
                                     "rolled out anew with the meta policy on the family's train tasks)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bags", nargs="+", action="extend", help="recorded bags of the new task (offline adaptation)")
    src.add_argument("--task-index", type=int, help="collect the new-task data in simulation (with --family)")
    _family_arg(p, required=False)
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--task-id", help="task id for bags that carry no /mql/episode topic")
    p.add_argument("--out", required=True, help="adapted checkpoint to write (report .txt/.png beside it)")
    p.add_argument("--new-steps", type=int, default=0)
    _adapt_set_arg(p)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("archive", help="inspect a replay archive")
    p.add_argument("action", choices=("info", "verify", "export"))
    p.add_argument("dir")
    p.add_argument("--out", help="export: .npz file to write")
    p.add_argument("--json", action="store_true")
    p.add_argument("--checkpoint", help="read the bags with this checkpoint's encoding (default: the package arm)")
    _family_arg(p, required=False)

    p = sub.add_parser("demo", help="adapt the shipped checkpoint to held-out tasks; compare with fine-tuning")
    p.add_argument("--checkpoint", help="default: the shipped checkpoints/arm_reach.pt")
    p.add_argument("--tasks", type=int, default=5, help="held-out tasks to adapt to")
    p.add_argument("--episodes", type=int, default=3, help="evaluation episodes per task and method")
    p.add_argument("--out", default="runs/demo", help="directory for the plot and the JSON results")
    p.add_argument("--seed", type=int, default=0)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads; more help only on an idle machine (on a loaded 2-core one, 2 threads "
                            f"ran the update 15x slower than 1); 1..{MAX_THREADS}")
    return parser


class _Interrupts:
    """SIGINT and SIGTERM as one KeyboardInterrupt, so that every command stops the same way on Ctrl-C, `kill`,
    `timeout` or `docker stop` (exit 1, "interrupted"), and further ones are ignored while it cleans up.

    A SIGTERM killed the process at once (the open bag of `train --archive` lost), and a second SIGINT cut
    the recorder's close short (a bag without metadata.yaml). Code that must not be cut (writing or closing a
    bag) runs in `deferred()`: a signal then takes effect when the block ends."""

    def __init__(self) -> None:
        self.signal_name = ""  # of the signal that stopped the run
        self._depth = 0
        self._pending = ""

    def install(self):
        """Handle SIGINT (unless ignored, as in a background job) and SIGTERM; returns the restorer."""
        self.signal_name, self._depth, self._pending = "", 0, ""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return lambda keep_ignoring=False: None
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old is signal.SIG_IGN:  # nohup, `cmd &` from a script: the user asked not to be stopped by it
                continue
            previous[sig] = old
            signal.signal(sig, self._handler)

        def restore(keep_ignoring: bool = False) -> None:
            for sig, old in previous.items():
                signal.signal(sig, signal.SIG_IGN if keep_ignoring else old)

        return restore

    def _handler(self, signum, frame) -> None:
        if self.signal_name:  # the run is already stopping: let its cleanup finish
            return
        name = signal.Signals(signum).name
        if self._depth:
            self._pending = self._pending or name
            return
        self.signal_name = name
        raise KeyboardInterrupt(name)

    @contextmanager
    def deferred(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending and not self.signal_name:
            self.signal_name, self._pending = self._pending, ""
            raise KeyboardInterrupt(self.signal_name)

    def deferring(self, fn):
        """fn run in deferred(): e.g. the recorder's add, called for every episode."""
        def call(*args, **kwargs):
            with self.deferred():
                return fn(*args, **kwargs)
        return call


INTERRUPTS = _Interrupts()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore = INTERRUPTS.install()
    try:
        _threads(args.threads)
        if hasattr(args, "seed"):  # every command but archive
            _check_seed(args.seed)
        _check_not_empty(args)
        return COMMANDS[args.command](args)
    except MQLError as e:
        print(f"mql-ros {args.command}: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"mql-ros {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        how = f" ({INTERRUPTS.signal_name})" if INTERRUPTS.signal_name == "SIGTERM" else ""
        print(f"mql-ros {args.command}: interrupted{how}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 -- the contract: anything unexpected is exit 1 with a reason
        print(f"mql-ros {args.command}: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        # From the command line (argv None) the process ends next: a further signal must not turn the clean
        # exit into a traceback. Called in-process (tests), the caller's handlers come back.
        restore(keep_ignoring=argv is None and bool(INTERRUPTS.signal_name))


def cmd_train(args: argparse.Namespace) -> int:
    from mql_ros import plots
    from mql_ros.core.checkpoint import save_checkpoint
    from mql_ros.core.config import continued_config, load_config
    from mql_ros.core.errors import InputError
    from mql_ros.core.training import meta_train

    if args.steps < 1:
        raise InputError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    _check_writable("--out", args.out)
    png = out.with_suffix(".png")
    _check_distinct([("--out", args.out), ("its learning curve", png)]
                    + ([("--archive", args.archive)] if args.archive else []),
                    [("--init", args.init)] if args.init and not _same_file(Path(args.init), out) else [])
    _check_writable("--out", args.out, side=png)
    family = _resolve_family(args.family)
    init, extra = None, {}
    if args.init:
        init, ckpt = _load_agent(args.init)
        # the checkpoint names its family as --family did: a built-in name or "package.module:attribute"
        if ckpt.family not in (args.family, family.name) and _resolve_family(ckpt.family).name != family.name:
            raise InputError(f"--init {args.init} was trained on {ckpt.family!r}, not on {family.name!r}")
        before = _init_curve(args.init, ckpt)  # checked now, not after the whole run
        cfg = continued_config(ckpt.config, args.config)
        extra["init"] = {"checkpoint": args.init, "sha256": ckpt.sha256, "command": ckpt.extra.get("command"),
                         "steps": ckpt.extra.get("steps")}
    else:
        cfg = load_config(args.config)
    encoding = _family_encoding(family)
    recorder = _archive_writer(args.archive, family, encoding) if args.archive else None
    try:
        # a signal while an episode is being written to the bag takes effect once it is written
        agent, curve = meta_train(family, cfg, args.steps, seed=args.seed, progress=not args.no_progress,
                                  on_episode=INTERRUPTS.deferring(recorder.add) if recorder else None, init=init)
    finally:
        if recorder is not None:
            with INTERRUPTS.deferred():  # a second Ctrl-C or a SIGTERM must not leave the open bag unfinished
                recorder.close()
    if init is not None:  # the learning curve goes on from where the initial checkpoint's ended
        step0, sec0 = (before[-1]["step"], before[-1]["seconds"]) if before else (0, 0.0)
        curve = before + [{**e, "step": e["step"] + step0, "seconds": e["seconds"] + sec0} for e in curve]
    sha = save_checkpoint(out, agent, args.family, encoding,
                          extra={"curve": curve, "steps": args.steps, "seed": args.seed,
                                 "command": "mql-ros " + " ".join(sys.argv[1:]), **extra})
    png = plots.learning_curve(curve, png, f"meta-training on {family.name}")
    print(f"wrote {out} (sha256 {sha[:12]}), learning curve {png}")
    return 0


def _init_curve(path: str, ckpt) -> list[dict]:
    """The learning curve of the --init checkpoint, which the new run's curve continues: a list of entries with
    a numeric step and seconds (a hand-edited one failed after the whole training run)."""
    from mql_ros.core.errors import CheckpointError

    curve = ckpt.extra.get("curve") or []
    for i, e in enumerate(curve if isinstance(curve, list) else [None]):
        if not (isinstance(e, dict) and all(isinstance(e.get(k), (int, float)) and not isinstance(e.get(k), bool)
                                            for k in ("step", "seconds"))):
            raise CheckpointError(f"checkpoint {path}: extra.curve[{i}] is not a learning-curve entry (a mapping "
                                  f"with numeric step and seconds), got {str(e)[:100]!r}: --init cannot continue it")
    return curve


def cmd_eval(args: argparse.Namespace) -> int:
    from mql_ros.core.errors import InputError
    from mql_ros.core.training import evaluate, evaluate_adapted, finetune_config

    if args.tasks < 0:
        raise InputError(f"--tasks must be >= 0 (0: all), got {args.tasks}")
    if args.episodes < 1:
        raise InputError(f"--episodes must be >= 1, got {args.episodes}")
    agent, ckpt = _load_agent(args.checkpoint)
    cfg = _adapt_config(agent.cfg.adapt, args)
    family = _resolve_family(args.family or ckpt.family)
    _check_dims(family, ckpt, args.checkpoint)
    tasks = _first_tasks(family, args.split, args.tasks)
    result: dict = {"split": args.split, "family": family.name, "checkpoint": args.checkpoint,
                    "episodes": args.episodes}
    zero = evaluate(agent, family, tasks, episodes=args.episodes, seed=args.seed, split=args.split)
    result["zero_shot"] = {"mean": float(np.mean(zero)), "per_task": zero}
    print(f"zero-shot   {args.split}: mean return {np.mean(zero):8.2f} over {len(tasks)} tasks")
    if args.adapt or args.finetune:
        archive = _load_or_roll_archive(args.archive, agent, family, args.seed)
        if args.adapt:
            ret, reports = evaluate_adapted(agent, family, tasks, archive, cfg, episodes=args.episodes,
                                            seed=args.seed, split=args.split)
            result["adapted"] = {"mean": float(np.mean(ret)), "per_task": ret,
                                 "ess": [r.ess for r in reports],
                                 "proximal_lambda": [r.proximal_lambda for r in reports]}
            print(f"MQL adapted {args.split}: mean return {np.mean(ret):8.2f}")
        if args.finetune:
            ret, _ = evaluate_adapted(agent, family, tasks, None, finetune_config(cfg), episodes=args.episodes,
                                      seed=args.seed, split=args.split)
            result["finetuned"] = {"mean": float(np.mean(ret)), "per_task": ret}
            print(f"fine-tuned  {args.split}: mean return {np.mean(ret):8.2f}")
    if args.json:
        try:
            line = json.dumps(result, allow_nan=False)  # the last line must be JSON, which has no NaN or inf
        except ValueError as e:
            raise InputError(f"the results of family {family.name!r} on split {args.split} are not finite "
                             f"numbers: {e}") from e
        print(line)
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from mql_ros import plots
    from mql_ros.core.adaptation import adapt
    from mql_ros.core.checkpoint import bag_encoding, save_checkpoint
    from mql_ros.core.errors import InputError
    from mql_ros.core.tasks import make_checked_env, split_tasks, task_id
    from mql_ros.core.training import collect_new_task_data

    out = Path(args.out)
    _check_writable("--out", args.out)
    weights_png, report_txt = out.with_suffix(".weights.png"), out.with_suffix(".report.txt")
    _check_distinct([("--out", args.out), ("its weight histogram", weights_png), ("its report", report_txt)],
                    [("--checkpoint", args.checkpoint)] + ([("--archive", args.archive)] if args.archive else [])
                    + [("--bags", b) for b in args.bags or []])
    for side in (weights_png, report_txt):
        _check_writable("--out", args.out, side=side)
    agent, ckpt = _load_agent(args.checkpoint)
    cfg = _adapt_config(agent.cfg.adapt, args)
    encoding = bag_encoding(ckpt)
    # with --bags and --archive everything comes from recorded data: the family is not even imported
    family = None if args.bags and args.archive else _resolve_family(args.family or ckpt.family)
    if family is not None:
        _check_dims(family, ckpt, args.checkpoint)
    archive = (_archive_replay(args.archive, agent, encoding) if args.archive
               else _load_or_roll_archive(None, agent, family, args.seed))
    if args.bags:
        from mql_ros.archive import load_episodes

        new = load_episodes(args.bags, robot=encoding, task_id=args.task_id, warn=_warn)
        source = f"bags {' '.join(args.bags)}"
    else:
        tasks = split_tasks(family, args.split)
        if not 0 <= args.task_index < len(tasks):
            raise InputError(f"--task-index {args.task_index} is outside the {args.split} split (0..{len(tasks) - 1})")
        name = task_id(family, args.split, args.task_index)
        env = make_checked_env(family, tasks[args.task_index], name)
        new = collect_new_task_data(agent, env, cfg.new_steps, np.random.default_rng(args.seed), name)
        source = name
    if not new:
        raise InputError(f"no new-task transitions in {source}")
    _warn_about_the_data(new, archive, cfg, args.archive or "the rolled-out snapshots", source)
    report = adapt(agent, new, archive, cfg, seed=args.seed)
    sha = save_checkpoint(out, agent, ckpt.family, encoding,
                          extra={"adapted_from": ckpt.sha256, "source": source, "report": report.to_dict()})
    lines = [f"adapted {args.checkpoint} -> {out} (sha256 {sha[:12]})", f"new-task data: {source}",
             f"new transitions: {report.n_new}, archived transitions: {report.n_archive}",
             f"propensity accuracy: {report.propensity_accuracy:.3f}",
             f"normalized ESS: {report.ess:.4f}", f"proximal lambda: {report.proximal_lambda:.4f}"]
    if report.weight_histogram:
        edges, counts = report.weight_histogram
        lines.append("weight histogram: " + ", ".join(f"[{a:.2f},{b:.2f}): {c}"
                                                      for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)))
        plots.weight_histogram(edges, counts, weights_png, f"propensity weights ({source})")
    text = "\n".join(lines)
    report_txt.write_text(text + "\n")
    print(text)
    return 0


def _warn_about_the_data(new: list, archive, cfg, archive_name: str, source: str) -> None:
    """Say so when adaptation will draw on no archive data (its propensity accuracy is then NaN), and why; and
    when the new-task data hold more than one task."""
    new_ids = sorted({e.task_id for e in new})
    if len(new_ids) > 1:
        _warn(f"the new-task data ({source}) hold {len(new_ids)} task ids ({', '.join(new_ids[:5])}"
              f"{', ...' if len(new_ids) > 5 else ''}): they are adapted to as one task")
    if not cfg.use_archive or archive is None:
        return
    held = [t for t in archive.task_ids() if archive.num_transitions(t) > 0]
    other = [t for t in held if t not in new_ids]
    if not held:
        _warn(f"no archive data used: {archive_name} holds no transitions")
    elif not other:
        _warn(f"no archive data used: every task in {archive_name} ({len(held)}: {', '.join(sorted(held)[:5])}"
              f"{', ...' if len(held) > 5 else ''}) is also in the new-task data, and adaptation draws only on "
              "other tasks' data")


def cmd_archive(args: argparse.Namespace) -> int:
    from mql_ros import archive
    from mql_ros.core.checkpoint import bag_encoding

    if args.checkpoint and args.family:
        print("mql-ros archive: give --checkpoint or --family, not both", file=sys.stderr)
        return 2
    encoding = (bag_encoding(_load_checkpoint(args.checkpoint)) if args.checkpoint
                else _family_encoding(_resolve_family(args.family)) if args.family else None)
    if args.action == "info":
        info = archive.archive_info(args.dir, encoding)
        print(json.dumps(info, indent=None if args.json else 2, default=str))
        return 0
    if args.action == "verify":
        report = archive.verify_archive(args.dir, encoding)
        print(report.summary())
        return 0 if report.ok else 2
    if not args.out:
        print("mql-ros archive export: --out FILE.npz is required", file=sys.stderr)
        return 2
    path = archive.export_archive(args.dir, args.out, encoding, warn=_warn)
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from mql_ros import plots
    from mql_ros.core.errors import InputError
    from mql_ros.core.paths import share_file
    from mql_ros.core.tasks import task_id
    from mql_ros.core.training import evaluate, evaluate_adapted, finetune_config

    start = time.perf_counter()
    if args.tasks < 1:
        raise InputError(f"--tasks must be >= 1, got {args.tasks}")
    if args.episodes < 1:
        raise InputError(f"--episodes must be >= 1, got {args.episodes}")
    _check_writable("--out", args.out, directory=True)
    for side in ("demo_returns.png", "demo_results.json"):
        _check_writable("--out", args.out, side=Path(args.out) / side)
    checkpoint = args.checkpoint or str(share_file("checkpoints/arm_reach.pt"))
    agent, ckpt = _load_agent(checkpoint)
    family = _resolve_family(ckpt.family)
    _check_dims(family, ckpt, checkpoint)
    tasks = _first_tasks(family, "test", args.tasks)
    names = [task_id(family, "test", i) for i in range(len(tasks))]
    print(f"checkpoint {checkpoint} (family {family.name}, sha256 {ckpt.sha256[:12]})")
    print(f"held-out tasks: {len(tasks)}; new-task data: one episode per task; {args.episodes} evaluation "
          "episodes per task and method")
    archive = _load_or_roll_archive(None, agent, family, args.seed)
    cfg = agent.cfg.adapt
    results = {"zero-shot": evaluate(agent, family, tasks, episodes=args.episodes, seed=args.seed, split="test")}
    results["MQL"], reports = evaluate_adapted(agent, family, tasks, archive, cfg, episodes=args.episodes,
                                               seed=args.seed)
    results["fine-tuning"], _ = evaluate_adapted(agent, family, tasks, None, finetune_config(cfg),
                                                 episodes=args.episodes, seed=args.seed)
    if hasattr(family, "oracle_return"):  # a controller that knows the task: the ceiling
        results["oracle"] = [family.oracle_return(task) for task in tasks]
    print(f"\n{'task':<22}" + "".join(f"{m:>13}" for m in results) + f"{'ESS':>8}{'lambda':>8}")
    for i, name in enumerate(names):
        print(f"{name:<22}" + "".join(f"{results[m][i]:13.2f}" for m in results)
              + f"{reports[i].ess:8.3f}{reports[i].proximal_lambda:8.3f}")
    print(f"{'mean':<22}" + "".join(f"{np.mean(v):13.2f}" for v in results.values()))
    out = Path(args.out)
    png = plots.returns_by_method(results, names, out / "demo_returns.png",
                                  f"{family.name}: held-out tasks, one episode of new data")
    (out / "demo_results.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "demo_results.json").write_text(json.dumps(
        {"checkpoint": checkpoint, "tasks": names, "returns": results,
         "reports": [r.to_dict() | {"losses": None} for r in reports]}, indent=1))
    print(f"\nplot: {png}\nresults: {out / 'demo_results.json'}\n"
          f"finished in {time.perf_counter() - start:.0f} s")
    return 0


def _warn(message: str) -> None:
    """A bag read with problems: its data are used, and the user is told which bag and what was kept."""
    print(f"mql-ros: warning: {message}", file=sys.stderr)


def _threads(n: int) -> None:
    from mql_ros.core.errors import InputError

    if not 1 <= n <= MAX_THREADS:
        raise InputError(f"--threads must be in 1..{MAX_THREADS}, got {n}")
    import torch

    torch.set_num_threads(n)


def _check_seed(seed: int) -> None:
    """numpy refuses a negative seed and torch one of 2**64 or more, deep in a run; the code also seeds with
    seed + 1 and seed + task index, so the bound is numpy's legacy 2**32 - 1, well inside both."""
    from mql_ros.core.errors import InputError

    if not 0 <= seed <= 2**32 - 1:
        raise InputError(f"--seed must be in 0..2**32-1, got {seed}")


def _check_not_empty(args) -> None:
    """An empty path or name was taken as "not given" (`--archive ''` recorded nothing, `--init ''` trained
    from scratch, `demo --checkpoint ''` used the shipped one): refused instead."""
    from mql_ros.core.errors import InputError

    for name in ("archive", "init", "checkpoint", "family", "task_id"):
        if getattr(args, name, None) == "":
            raise InputError(f"--{name.replace('_', '-')} is empty: give a "
                             f"{'name' if name in ('family', 'task_id') else 'path'} or leave the option out")


def _check_writable(flag: str, path: str, directory: bool = False, side: Path | None = None) -> None:
    """InputError naming `flag` if `path` (a file, or a directory to write files in) cannot be written: found
    out before the work, not after it, when the result would be lost. Missing parents are created later.

    Writability is probed by creating and removing a temporary file in the directory (or its nearest existing
    ancestor): os.access says yes to root everywhere, and /proc or /sys refuse files whatever the mode bits.
    `side`: a file written beside `path` (a learning curve, a report), which must not be a directory."""
    from mql_ros.core.errors import InputError

    target = Path(path)
    if side is not None:
        if side.is_dir():
            raise InputError(f"{flag} {path}: {side}, written beside it, is a directory")
        return
    if directory and target.exists() and not target.is_dir():
        raise InputError(f"{flag} {path} is not a directory")
    if not directory and target.is_dir():
        raise InputError(f"{flag} {path} is a directory, not a file")
    start = target if directory else target.parent
    existing = next(p for p in (start, *start.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mql-ros-write-probe.", dir=existing)
    except OSError as e:
        reason = "no permission to write in" if isinstance(e, PermissionError) else "cannot write in"
        raise InputError(f"{flag} {path}: {reason} {existing} ({e.strerror or type(e).__name__})") from e
    os.close(fd)
    os.unlink(probe)


def _same_file(a: Path, b: Path) -> bool:
    """The same file or directory: by inode when both exist (symlinks and hard links), else by resolved path."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _check_distinct(outputs: list[tuple[str, str | Path]], inputs: list[tuple[str, str | Path]] = ()) -> None:
    """The files a command writes must differ from each other and from what it reads: `train --out model.png`
    had its learning curve replace the checkpoint, `adapt --out X --checkpoint X` replaced the meta-trained
    checkpoint. Paths are named as given on the command line."""
    from mql_ros.core.errors import InputError

    for i, (name_a, a) in enumerate(outputs):
        for name_b, b in [*outputs[i + 1:], *inputs]:
            if _same_file(Path(a), Path(b)):
                raise InputError(f"{name_a} {a} and {name_b} {b} are the same path: the run would overwrite one "
                                 "with the other; give another --out")


def _check_dims(family, ckpt, checkpoint: str) -> None:
    """A family the checkpoint's networks cannot read, found before any rollout rather than at its first act()."""
    from mql_ros.core.errors import InputError

    spec = _family_encoding(family)
    if (spec.obs_dim, spec.act_dim) != (ckpt.obs_dim, ckpt.act_dim):
        raise InputError(f"family {family.name!r} has obs/act dims {spec.obs_dim}/{spec.act_dim}, the checkpoint "
                         f"{checkpoint} was trained with {ckpt.obs_dim}/{ckpt.act_dim}")


def _first_tasks(family, split: str, n: int) -> list[dict]:
    """The first n tasks of the split (0: all); an empty split is an error, not a mean return of NaN."""
    from mql_ros.core.errors import InputError
    from mql_ros.core.tasks import split_tasks

    tasks = split_tasks(family, split)
    if not tasks:
        raise InputError(f"split {split} of family {family.name!r} has no tasks")
    return tasks[:n] if n > 0 else tasks


def _load_checkpoint(path: str):
    from mql_ros.core.checkpoint import load_checkpoint
    from mql_ros.core.errors import CheckpointError

    if Path(path).is_dir():  # load_checkpoint says "no such file"
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    return load_checkpoint(path)


def _load_agent(path: str):
    from mql_ros.core.checkpoint import agent_from_checkpoint

    ckpt = _load_checkpoint(path)
    return agent_from_checkpoint(ckpt), ckpt


def _resolve_family(spec: str):
    """tasks.resolve_family; a user module that raises SystemExit on import (or its factory) is bad input
    naming it, not the end of the CLI with that module's status and no message."""
    from mql_ros.core.errors import InputError
    from mql_ros.core.tasks import resolve_family

    try:
        return resolve_family(spec)
    except SystemExit as e:
        module = spec.partition(":")[0] if isinstance(spec, str) else spec
        raise InputError(f"task family {spec!r}: module {module!r} raised SystemExit({e.code!r}) (on import or in "
                         "its factory)") from e


def _adapt_config(stored, args):
    """The checkpoint's adapt: settings with --adapt-set overrides, then --new-steps if given."""
    from dataclasses import replace

    from mql_ros.core.errors import InputError

    if not 0 <= args.new_steps <= MAX_NEW_STEPS:
        raise InputError(f"--new-steps must be in 0..{MAX_NEW_STEPS:_} (0: one episode), got {args.new_steps}")
    keys = [item.partition("=")[0].strip() for item in args.adapt_set]
    twice = sorted({k for k in keys if k and keys.count(k) > 1})
    if twice:  # a config file refuses a key given twice; so does the command line
        raise InputError(f"--adapt-set gives {', '.join(twice)} more than once")
    cfg = stored.with_overrides(args.adapt_set)
    return replace(cfg, new_steps=args.new_steps) if args.new_steps else cfg


def _archive_replay(directory: str, agent, robot):
    """The archived meta-training data, as a replay the adaptation can reweight."""
    from mql_ros.archive import load_episodes
    from mql_ros.core.errors import InputError
    from mql_ros.core.replay import MultiTaskReplay

    episodes = load_episodes(directory, robot=robot, warn=_warn)
    if not episodes:
        raise InputError(f"archive {directory} holds no episodes")
    replay = MultiTaskReplay(agent.cfg.history_len, agent.cfg.replay_size)
    for e in episodes:
        replay.add_episode(e)
    return replay


def _family_encoding(family):
    """How the family's episodes sit on the contract topics: the arm's RobotSpec, else its spaces' BoxSpec.

    A family that wraps the arm into other observations or actions is a BoxSpec of the wrapped spaces: the
    arm's RobotSpec would not fit the agent (the checkpoint refused it after the whole training run)."""
    from mql_ros.core.robot import BoxSpec
    from mql_ros.core.tasks import make_checked_env, split_tasks

    tasks = split_tasks(family, "train")
    if not tasks:
        from mql_ros.core.errors import InputError

        raise InputError(f"family {family.name!r} has no train tasks")
    env = make_checked_env(family, tasks[0], f"{family.name}/train/0")
    spec = BoxSpec.from_spaces(env.observation_space, env.action_space, f"family {family.name!r}")
    robot = getattr(env.unwrapped, "robot", None)
    fits = robot is not None and (robot.obs_dim, robot.act_dim) == (spec.obs_dim, spec.act_dim)
    return robot if fits else spec


def _load_or_roll_archive(directory: str | None, agent, family, seed: int):
    """The archive if given; otherwise per-task snapshots rolled out anew with the meta policy
    (see mql_ros.core.snapshots)."""
    if directory:
        return _archive_replay(directory, agent, _family_encoding(family))
    from mql_ros.core.snapshots import rollout_snapshots

    return rollout_snapshots(agent, family, episodes_per_task=4, seed=seed)


def _archive_writer(directory: str, family, encoding):
    """The archive recorder of `train --archive`, refusing an archive whose bags hold another family's
    episodes or another encoding: appending made it fail `archive verify` under either encoding, and adapt
    warned about every foreign bag."""
    from mql_ros.archive import EpisodeArchiveWriter
    from mql_ros.archive.inspect import recorded_identity
    from mql_ros.core.errors import InputError

    env = family.make_env(family.train_tasks()[0]).unwrapped
    writer = EpisodeArchiveWriter(directory, robot=encoding, family=family.name,
                                  control_dt=getattr(env, "control_dt", 0.04))
    ours = (tuple(encoding.arm_joints), tuple(encoding.gripper_joints))
    for bag, (bag_family, joints) in recorded_identity(directory):
        if bag_family is not None and bag_family != family.name:
            raise InputError(f"--archive {directory} holds episodes of family {bag_family!r} (bag {bag.name}), "
                             f"this run is of family {family.name!r}: record into another directory")
        if joints is not None and joints != ours:
            raise InputError(f"--archive {directory} holds bags of another encoding (bag {bag.name}: joints "
                             f"{_joint_list(joints)}), this run's {type(encoding).__name__} records joints "
                             f"{_joint_list(ours)}: record into another directory")
    return writer


def _joint_list(joints: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    names = list(joints[0]) + list(joints[1])
    return ", ".join(names[:4]) + (f", ... ({len(names)})" if len(names) > 4 else "")


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "adapt": cmd_adapt, "archive": cmd_archive, "demo": cmd_demo}

if __name__ == "__main__":
    sys.exit(main())
