"""The benchmarks run to their end and report what they claim to (smallest settings; no timing asserted).

A benchmark that crashes after its long part (the adaptation table's print once did) loses the whole run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_adaptation_benchmark_runs_end_to_end_with_adapt_overrides_and_reports_the_gap_closed():
    out = _run("benchmarks/adaptation.py", "--seeds", "1", "--tasks", "1", "--episodes", "1", "--splits", "test",
               "--adapt-set", "new_task_iters=2", "archive_iters=3", "lr=1e-3", "proximal=ess", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert ("adaptation 2+3 iterations, MQL lambda ess, other-lambda fixed; "
            "--adapt-set new_task_iters=2 archive_iters=3 lr=1e-3 proximal=ess;") in out.stdout
    assert "| split | tasks | zero-shot | MQL |" in out.stdout
    row = _last_json(out.stdout)["test"]
    assert row["tasks"] == 1 and row["seeds"] == 1
    assert set(row["gap_closed"]) == {"MQL", "MQL other-lambda", "fine-tuning", "proximal fine-tuning"}
    assert all(math.isfinite(v) for v in row["mean"].values())
    assert set(row["gap_closed_90"]) == {"MQL", "MQL other-lambda", "fine-tuning", "proximal fine-tuning",
                                         "MQL - fine-tuning", "MQL - proximal fine-tuning"}
    assert "90% bootstrap intervals of the gap closed" in out.stdout


def test_adaptation_benchmark_refuses_a_bad_adapt_override_before_any_work():
    for item, named in (("archive_iters=-1", "archive_iters"), ("archive_itters=400", "archive_itters"),
                        ("archive_iters", "KEY=VALUE")):
        out = _run("benchmarks/adaptation.py", "--adapt-set", item)
        assert out.returncode == 2 and named in out.stderr, (item, out.stderr[-2000:])


@pytest.fixture
def adaptation_benchmark(monkeypatch):
    """benchmarks/adaptation.py as a module, importing its sibling adapt_setup as the script does."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("adaptation_benchmark", ROOT / "benchmarks" / "adaptation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gap_intervals_collapse_to_the_point_value_when_no_cell_varies(adaptation_benchmark):
    const = {"zero-shot": -4.0, "MQL": -3.0, "MQL other-lambda": -3.5, "fine-tuning": -3.5,
             "proximal fine-tuning": -3.25, "oracle": -2.0}
    cells = {m: np.full((3, 5), v) for m, v in const.items()}
    got = adaptation_benchmark.gap_intervals(cells, np.random.default_rng(0), reps=200)
    assert got["MQL"] == pytest.approx([0.5, 0.5])
    assert got["fine-tuning"] == pytest.approx([0.25, 0.25])
    assert got["proximal fine-tuning"] == pytest.approx([0.375, 0.375])
    assert got["MQL - fine-tuning"] == pytest.approx([0.25, 0.25])
    assert got["MQL - proximal fine-tuning"] == pytest.approx([0.125, 0.125])


def test_gap_intervals_widen_with_task_to_task_spread_and_hold_the_point_estimate(adaptation_benchmark):
    rng = np.random.default_rng(1)
    base = {"zero-shot": -4.0, "MQL other-lambda": -3.5, "fine-tuning": -3.5, "proximal fine-tuning": -3.5,
            "oracle": -2.0}
    cells = {m: np.full((3, 5), v) for m, v in base.items()}
    widths = []
    for spread in (0.1, 1.0):
        cells["MQL"] = -3.0 + spread * rng.standard_normal((3, 5))
        lo, hi = adaptation_benchmark.gap_intervals(cells, np.random.default_rng(0), reps=500)["MQL"]
        point = (cells["MQL"].mean() + 4.0) / 2.0
        assert lo <= point <= hi
        widths.append(hi - lo)
    assert widths[1] > 3 * widths[0]


def test_gap_closed_is_not_a_number_when_zero_shot_already_beats_the_oracle(adaptation_benchmark):
    means = {"zero-shot": -2.9, "MQL": -2.8, "MQL other-lambda": -3.0, "fine-tuning": -3.5,
             "proximal fine-tuning": -3.2, "oracle": -3.0}
    assert all(math.isnan(v) for v in adaptation_benchmark.gap_closed(means).values())
    cells = {m: np.full((3, 5), v) for m, v in means.items()}
    got = adaptation_benchmark.gap_intervals(cells, np.random.default_rng(0), reps=50)
    assert all(math.isnan(x) for pair in got.values() for x in pair)
    means["oracle"] = -1.9
    assert adaptation_benchmark.gap_closed(means)["MQL"] == pytest.approx(0.1)


def test_gap_intervals_are_not_a_number_when_the_gap_itself_is_within_the_task_spread(adaptation_benchmark):
    cells = {m: np.full((3, 5), v) for m, v in
             {"zero-shot": -3.0, "MQL": -2.97, "MQL other-lambda": -3.0, "fine-tuning": -3.1,
              "proximal fine-tuning": -3.05}.items()}
    cells["oracle"] = np.tile([-2.5, -3.4, -2.9, -3.3, -2.6], (3, 1))  # mean -2.94: a gap of 0.06 on average only
    means = {m: float(v.mean()) for m, v in cells.items()}
    assert adaptation_benchmark.gap_closed(means)["MQL"] == pytest.approx(0.5)
    got = adaptation_benchmark.gap_intervals(cells, np.random.default_rng(0), reps=400)
    assert all(math.isnan(x) for pair in got.values() for x in pair)


def test_validation_guard_benchmark_compares_each_margin_with_always_accepting_and_hindsight():
    out = _run("benchmarks/validation_guard.py", "--tasks", "2", "--seeds", "1", "--episodes", "1",
               "--adapt-set", "new_task_iters=2", "archive_iters=3", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    res = _last_json(out.stdout)
    accepted = [row["accepted"] for row in res["margins"].values()]
    assert accepted == sorted(accepted) and all(0 <= a <= 2 for a in accepted)  # a larger margin refuses less
    assert all(row["return_change"] <= res["hindsight"] + 1e-9 for row in res["margins"].values())
    assert res["always_accept"] <= res["hindsight"] + 1e-9
    assert "| always accept (baseline) | 2/2 |" in out.stdout


def test_speed_benchmark_reports_both_contenders_and_the_gru_path():
    out = _run("benchmarks/speed.py", "--quick", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    res = _last_json(out.stdout)
    assert res["updates_per_s"]["td3context"] > 0 and res["updates_per_s"]["plain"] > 0
    assert res["sizes"]["gru_step_loops"] in ("C kernel", "numpy")
    assert res["step_latency_us"]["deployed_median"] > 0


def test_oracle_search_benchmark_times_both_scorers_on_returns_it_found_identical():
    out = _run("benchmarks/oracle_search.py", "--quick", "--json")
    assert out.returncode == 0, out.stderr[-2000:]  # it exits 1 when the two scorers' returns differ
    res = _last_json(out.stdout)
    assert res["rounds"] == 2 and res["population"] == 4
    assert res["seconds_per_round"]["stepped"] > 0 and res["seconds_per_round"]["rollout"] > 0
    assert "returns identical in every round" in out.stdout


def test_preactivation_benchmark_trains_with_and_without_the_penalty():
    out = _run("benchmarks/preactivation.py", "--steps", "600", "--episodes", "1", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    res = _last_json(out.stdout)
    assert [r["actor_preactivation_l2"] for r in res["runs"]] == [0.0, 0.01]
    assert all(math.isfinite(r["return"]) and 0.0 <= r["saturated_fraction"] <= 1.0 for r in res["runs"])
    assert res["oracle_return"] < 0


def test_observed_target_config_is_the_shipped_recipe_with_the_target_observed():
    train = yaml.safe_load((ROOT / "config" / "arm_reach_train.yaml").read_text())
    observed = yaml.safe_load((ROOT / "config" / "arm_reach_observed.yaml").read_text())
    assert observed == {**train, "use_context": False}


def test_target_inference_benchmark_evaluates_a_target_observed_checkpoint_trained_by_mql_ros_train(tmp_path):
    observed = tmp_path / "observed.pt"
    train = _run("-m", "mql_ros.cli", "train", "--family", "benchmarks.target_inference:ObservedTargetReach",
                 "--steps", "300", "--config", "config/arm_reach_observed.yaml", "--out", str(observed),
                 "--no-progress")
    assert train.returncode == 0, train.stderr[-2000:]
    out = _run("benchmarks/target_inference.py", "--tasks", "1", "--episodes", "1", "--decoder-iters", "50",
               "--observed-checkpoint", str(observed), "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"target-observed checkpoint {observed}" in out.stdout
    res = _last_json(out.stdout)
    for split in ("train", "test"):
        for key in ("observed", "identified"):
            m = res[split][key]
            assert set(m["distance_cm"]) == {str(s) for s in res["steps"]}, key
            assert all(math.isfinite(v) and v >= 0 for v in m["distance_cm"].values()), key
            assert m["return"] < 0, key
    out = _run("benchmarks/identify_then_act.py", "--observed-checkpoint", str(observed), "--seeds", "1", "--tasks",
               "1", "--episodes", "1", "--splits", "test", "--decoder-iters", "50", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    row = _last_json(out.stdout)["test"]
    assert set(row["mean"]) == {"zero-shot", "identify-then-act", "told policy", "oracle"}
    assert all(math.isfinite(v) and v < 0 for v in row["mean"].values())
    assert set(row["gap_closed"]) == set(row["gap_closed_90"]) == {"identify-then-act", "told policy"}
    # the shipped (context) checkpoint is not a target-observed one: refused before any rollout
    shipped = str(ROOT / "checkpoints" / "arm_reach.pt")
    for script in ("benchmarks/target_inference.py", "benchmarks/identify_then_act.py"):
        out = _run(script, "--observed-checkpoint", shipped)
        assert out.returncode == 2 and "not on 'arm_reach_observed_target'" in out.stderr, out.stderr[-2000:]
    out = _run("benchmarks/target_inference.py", "--observed-checkpoint", str(observed), "--observed-steps", "10")
    assert out.returncode == 2 and "give one" in out.stderr, out.stderr[-2000:]


def test_target_inference_benchmark_reports_context_policy_and_observed_target_side_by_side():
    out = _run("benchmarks/target_inference.py", "--tasks", "1", "--episodes", "1", "--decoder-iters", "50",
               "--observed-steps", "300", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    res = _last_json(out.stdout)
    steps = {str(s) for s in res["steps"]}
    for split in ("train", "test", "ood"):
        row = res[split]
        assert set(row["context_error_cm"]) == steps
        assert all(math.isfinite(v) and v >= 0 for v in row["context_error_cm"].values())
        for key in ("policy", "observed", "identified", "oracle"):
            m = row[key]
            assert set(m["distance_cm"]) == steps, key
            assert all(math.isfinite(v) and v >= 0 for v in m["distance_cm"].values()), key
            # the return split at arrival adds up to the whole one
            assert m["return_before_arrival"] + m["return_after_arrival"] == pytest.approx(m["return"]), key
            assert m["return"] < 0, key
        # the oracle holds its tool at the target once there (0.0-0.1 cm from step 10 on the first held-out targets)
        assert row["oracle"]["distance_cm"]["49"] < 1.0


@pytest.mark.ros
def test_graph_return_benchmark_pairs_graph_episodes_with_ros_free_rollouts_of_the_same_seeds():
    pytest.importorskip("rclpy")
    out = _run("benchmarks/graph_return.py", "--tasks", "1", "--episodes", "1", "--repeats", "1", "--json")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    res = _last_json(out.stdout)
    (row,) = res["tasks"]
    assert row["task_id"] == "arm_reach/test/0" and len(row["seeds"]) == 1
    assert 0 < row["rewards_per_episode"][0] <= 50
    assert set(row["per_episode"]) == {"graph", "ros_free", "limited"}
    assert all(len(v) == 1 and math.isfinite(v[0]) and v[0] < 0 for v in row["per_episode"].values())
    (run,) = res["runs"]
    assert run["ticks"] > 0 and 0 <= run["held_ticks"] <= run["ticks"]
    assert set(res["differences"]) == {"graph - ROS-free", "graph - limited", "limited - ROS-free"}
    assert "graph - ROS-free" in out.stdout and "held ticks" in out.stdout
