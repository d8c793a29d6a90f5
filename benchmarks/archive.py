"""Speed and memory of the rosbag2 archive, each number next to the per-message rosbags baseline of the same run.

1. Write rate (messages/s) of EpisodeArchiveWriter (rosbags Writer, MCAP, 20 episodes of 200 steps per bag).
   There is one writer, so this is the baseline itself; it is printed for scale.
2. First conversion (cold cache): messages/s of the fast path (bulk CDR decoding + StepRule + writing the
   columnar cache) against read_bag_per_message (rosbags deserialize_cdr per message + TransitionBuilder).
   The baseline runs on a subset of the bags (`--baseline-bags`, default 10% of them) and is extrapolated
   per message; the output says so. `--baseline-bags 0` runs it on every bag.
3. Warm load of N transitions: load_episodes with a current cache (memory-mapped Episodes), and the same
   plus copying them into a MultiTaskReplay of capacity N (the arrays `mql-ros train/adapt --archive` use),
   against the baseline's per-message time for N transitions.
4. Memory: peak RSS growth (anonymous and file-backed, sampled from /proc/self/status every 20 ms) of each
   phase, and tracemalloc peaks of both paths on one bag; the archive and cache sizes on disk, to show that
   the memory a warm load holds is independent of the archive's size (the arrays are memory-mapped; file
   pages are reclaimable, anonymous ones are not).

    .venv/bin/python benchmarks/archive.py [--transitions N] [--quick] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mql_ros.archive import EpisodeArchiveWriter, load_episodes  # noqa: E402
from mql_ros.archive.bags import bag_dirs, read_bag, read_bag_per_message  # noqa: E402
from mql_ros.archive.columnar import CACHE_DIR_NAME  # noqa: E402
from mql_ros.core.episode import Episode  # noqa: E402
from mql_ros.core.replay import MultiTaskReplay  # noqa: E402
from mql_ros.core.robot import RobotSpec  # noqa: E402

STEPS, PER_BAG = 200, 20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class PeakRSS:
    """Peak growth of RssAnon and RssFile (MiB) while the block runs, sampled every 20 ms."""

    def __enter__(self):
        self.base = (_status_kb("RssAnon"), _status_kb("RssFile"))
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak = tuple(max(p, v) for p, v in zip(self.peak, (_status_kb("RssAnon"),
                                                                    _status_kb("RssFile")), strict=True))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.anon_mib = (self.peak[0] - self.base[0]) / 1024
        self.file_mib = (self.peak[1] - self.base[1]) / 1024


def _size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def write_archive(directory: Path, robot: RobotSpec, transitions: int, seed: int = 0) -> tuple[int, float]:
    rng = np.random.default_rng(seed)
    writer = EpisodeArchiveWriter(directory, robot, family="bench", episodes_per_bag=PER_BAG)
    n_episodes = -(-transitions // STEPS)
    lo, hi = np.array(robot.arm_lower), np.array(robot.arm_upper)
    start = time.perf_counter()
    for i in range(n_episodes):
        obs = rng.normal(scale=0.1, size=(STEPS + 1, robot.obs_dim)).astype(np.float32)
        obs[:, : robot.n_arm] = np.clip(obs[:, : robot.n_arm], lo, hi)
        writer.add(Episode(f"bench/task/{i % 10}", obs, rng.uniform(-1, 1, (STEPS, robot.act_dim)),
                           rng.normal(size=STEPS)))
    writer.close()
    elapsed = time.perf_counter() - start
    messages = n_episodes * (STEPS * 5 + 4)
    return messages, elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--transitions", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="20k transitions, a few seconds")
    ap.add_argument("--baseline-bags", type=int, default=None,
                    help="bags the per-message baseline reads (default 10%%, at least 2; 0 = all)")
    ap.add_argument("--keep", help="write the archive here and keep it (default: a temporary directory)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n = 20_000 if args.quick else args.transitions
    robot = RobotSpec.from_urdf()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mql_archive_bench_"))
    archive = root / "archive"
    if archive.exists():
        shutil.rmtree(archive)
    try:
        print(f"archive benchmark: {n:,} transitions, episodes of {STEPS} steps, {PER_BAG} episodes per bag, "
              f"in {archive}")
        with PeakRSS() as mem_write:
            written, t_write = write_archive(archive, robot, n)
        bags = bag_dirs(archive)
        archive_mib = _size_mib(archive)
        print(f"\n1. write: {written:,} messages in {t_write:.1f} s = {written / t_write:,.0f} messages/s "
              f"(rosbags Writer; the only writer, so this is the baseline) -> {len(bags)} bags, "
              f"{archive_mib:.0f} MiB; peak RSS growth {mem_write.anon_mib:.0f} MiB anon")

        # -- baseline: per-message decoding on a subset, extrapolated per message
        k = args.baseline_bags
        k = len(bags) if k == 0 else (k if k is not None else max(2, len(bags) // 10))
        subset = bags[: min(k, len(bags))]
        with PeakRSS() as mem_base:
            start = time.perf_counter()
            base_msgs = base_trans = 0
            for bag in subset:
                _, report = read_bag_per_message(bag, robot)
                base_msgs += sum(report.messages.values())
                base_trans += report.transitions
            t_base = time.perf_counter() - start
        base_rate = base_msgs / t_base
        per_transition = t_base / base_trans
        note = "" if len(subset) == len(bags) else \
            f" (measured on {len(subset)} of {len(bags)} bags, {base_msgs:,} messages; extrapolated per message)"

        # -- fast path, cold cache
        with PeakRSS() as mem_cold:
            start = time.perf_counter()
            episodes = load_episodes(archive, robot)
            t_cold = time.perf_counter() - start
        total_msgs = written
        total_trans = sum(len(e) for e in episodes)
        assert total_trans == n_transitions(n), (total_trans, n)
        cold_rate = total_msgs / t_cold
        del episodes
        print(f"\n2. first conversion (cold cache, {total_msgs:,} messages -> {total_trans:,} transitions):\n"
              f"   fast path   {cold_rate:>12,.0f} messages/s  ({t_cold:.2f} s, writes the cache)\n"
              f"   per-message {base_rate:>12,.0f} messages/s  ({total_msgs / base_rate:.1f} s for all){note}\n"
              f"   speed-up {cold_rate / base_rate:.1f}x; target >= 200,000 messages/s: "
              f"{'met' if cold_rate >= 200_000 else 'NOT met'}")

        # -- warm load
        with PeakRSS() as mem_warm:
            start = time.perf_counter()
            episodes = load_episodes(archive, robot)
            t_warm = time.perf_counter() - start
        with PeakRSS() as mem_replay:
            start = time.perf_counter()
            replay = MultiTaskReplay(history_len=10, capacity=total_trans)
            for e in episodes:
                replay.add_episode(e)
            t_fill = time.perf_counter() - start
        batch = replay.sample(256, np.random.default_rng(0))
        assert len(batch) == 256
        t_base_all = per_transition * total_trans
        cache_mib = _size_mib(archive / CACHE_DIR_NAME)
        print(f"\n3. warm load of {total_trans:,} transitions (cache {cache_mib:.0f} MiB):\n"
              f"   load_episodes (memory-mapped Episodes)          {t_warm:6.2f} s\n"
              f"   + copied into a MultiTaskReplay (training arrays) {t_warm + t_fill:6.2f} s\n"
              f"   per-message baseline for the same transitions      {t_base_all:6.1f} s{note and ' (extrapolated)'}\n"
              f"   speed-up {t_base_all / (t_warm + t_fill):.0f}x; target <= 3 s: "
              f"{'met' if t_warm + t_fill <= 3.0 else 'NOT met'}")

        # -- memory
        one = bags[0]
        tracemalloc.start()
        read_bag_per_message(one, robot)
        _, peak_slow = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        for entry in (archive / CACHE_DIR_NAME).glob(f"{one.name}-*"):
            shutil.rmtree(entry)
        peaks = []
        for _ in ("cold", "warm"):
            tracemalloc.start()
            read_bag(one, robot)
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
        print(f"\n4. memory (archive {archive_mib:.0f} MiB on disk, cache {cache_mib:.0f} MiB):\n"
              f"   peak RSS growth, per-message baseline on its subset: {mem_base.anon_mib:7.0f} MiB anon\n"
              f"   peak RSS growth, fast path cold (all bags):          {mem_cold.anon_mib:7.0f} MiB anon, "
              f"{mem_cold.file_mib:.0f} MiB file-backed\n"
              f"   peak RSS growth, warm load (all bags):               {mem_warm.anon_mib:7.0f} MiB anon, "
              f"{mem_warm.file_mib:.0f} MiB file-backed (reclaimable mapped cache pages)\n"
              f"   peak RSS growth, copying into MultiTaskReplay:       {mem_replay.anon_mib:7.0f} MiB anon "
              f"(bounded by the replay's capacity, not the archive)\n"
              f"   tracemalloc peak for one bag ({PER_BAG * STEPS:,} transitions): per-message "
              f"{peak_slow / 2**20:.1f} MiB, fast path cold {peaks[0] / 2**20:.1f} MiB, "
              f"warm {peaks[1] / 2**20:.2f} MiB")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def n_transitions(n: int) -> int:
    return -(-n // STEPS) * STEPS


if __name__ == "__main__":
    sys.exit(main())
