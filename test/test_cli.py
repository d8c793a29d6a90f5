"""`mql-ros` end to end on the tiny point family: train, eval --json, adapt, and its exit statuses."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_archive import cut_before_summary

ROOT = Path(__file__).resolve().parents[1]
TINY = "start_steps: 150\nhistory_len: 20\nhidden_sizes: [32, 32]\nbatch_size: 32\n"


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mql_ros.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli")
    (out / "tiny.yaml").write_text(TINY)
    ckpt = out / "point.pt"
    r = run_cli("train", "--family", "point_goal", "--steps", "300", "--config", str(out / "tiny.yaml"),
                "--out", str(ckpt), "--no-progress")
    assert r.returncode == 0, r.stderr
    return ckpt


def test_train_writes_a_checkpoint_and_a_learning_curve_png(tiny_checkpoint):
    assert tiny_checkpoint.stat().st_size > 0
    png = tiny_checkpoint.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_init_continues_a_checkpoint_with_the_keys_its_config_changes(tiny_checkpoint, tmp_path):
    from mql_ros.core.checkpoint import load_checkpoint

    (tmp_path / "final.yaml").write_text("lr: 0.0001\nexpl_noise: 0.05\nstart_steps: 0\n")
    out = tmp_path / "final.pt"
    r = run_cli("train", "--family", "point_goal", "--steps", "100", "--init", str(tiny_checkpoint), "--config",
                "final.yaml", "--out", str(out), "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    base, final = load_checkpoint(tiny_checkpoint), load_checkpoint(out)
    assert final.config == replace(base.config, lr=1e-4, expl_noise=0.05, start_steps=0)
    assert final.extra["init"]["sha256"] == base.sha256
    # the learning curve goes on from the base run's last entry
    assert final.extra["curve"][: len(base.extra["curve"])] == base.extra["curve"]
    assert final.extra["curve"][-1]["step"] == base.extra["curve"][-1]["step"] + 100


@pytest.mark.parametrize("family, config, message", [
    ("arm_reach", "", "trained on 'point_goal', not on 'arm_reach'"),
    ("point_goal", "hidden_sizes: [16, 16]\n", "hidden_sizes ((32, 32) -> (16, 16))"),
])
def test_train_init_refuses_another_family_or_network_shape(tiny_checkpoint, tmp_path, family, config, message):
    (tmp_path / "final.yaml").write_text(config)
    r = run_cli("train", "--family", family, "--steps", "10", "--init", str(tiny_checkpoint), "--config",
                "final.yaml", "--out", "x.pt", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_eval_json_last_line_has_the_contract_keys(tiny_checkpoint):
    r = run_cli("eval", "--checkpoint", str(tiny_checkpoint), "--tasks", "2", "--episodes", "1", "--adapt",
                "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["split"] == "test"
    for key in ("zero_shot", "adapted"):
        assert len(result[key]["per_task"]) == 2
        assert result[key]["mean"] == pytest.approx(sum(result[key]["per_task"]) / 2)


def test_adapt_without_archive_uses_rolled_out_snapshots_and_writes_checkpoint_and_report(tiny_checkpoint, tmp_path):
    from mql_ros.core.checkpoint import load_checkpoint

    out = tmp_path / "adapted.pt"
    r = run_cli("adapt", "--checkpoint", str(tiny_checkpoint), "--family", "point_goal", "--task-index", "0",
                "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "normalized ESS" in r.stdout
    adapted = load_checkpoint(out)
    assert adapted.extra["adapted_from"] == load_checkpoint(tiny_checkpoint).sha256
    assert out.with_suffix(".report.txt").is_file()


def test_adapt_set_overrides_the_stored_adaptation_settings_for_the_run(tiny_checkpoint, tmp_path):
    from mql_ros.core.checkpoint import load_checkpoint

    out = tmp_path / "adapted.pt"
    r = run_cli("adapt", "--checkpoint", str(tiny_checkpoint), "--family", "point_goal", "--task-index", "0",
                "--out", str(out), "--adapt-set", "new_task_iters=2", "archive_iters=3", "proximal=ess")
    assert r.returncode == 0, r.stderr
    report = load_checkpoint(out).extra["report"]
    assert (report["config"]["archive_iters"], report["config"]["proximal"]) == (3, "ess")
    assert [loss["phase"] for loss in report["losses"]] == ["new", "new", "archive", "archive", "archive"]
    assert load_checkpoint(tiny_checkpoint).config.adapt.archive_iters == 100


@pytest.mark.parametrize("args, message", [
    (("eval", "--checkpoint", "x.pt", "--adapt", "--adapt-set", "archive_itters=3"), "archive_itters"),
    (("adapt", "--checkpoint", "x.pt", "--task-index", "0", "--out", "y.pt", "--adapt-set", "lr"),
     "expected KEY=VALUE"),
])
def test_bad_adapt_set_exits_2_naming_the_item(tiny_checkpoint, tmp_path, args, message):
    args = tuple(str(tiny_checkpoint) if a == "x.pt" else a for a in args)
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr


@pytest.mark.parametrize("args, message", [
    (("train", "--family", "no_such_family", "--steps", "10", "--out", "x.pt"), "unknown task family"),
    (("train", "--family", "point_goal", "--steps", "0", "--out", "x.pt"), "--steps"),
    (("eval", "--checkpoint", "missing.pt"), "missing.pt"),
    (("eval", "--checkpoint", "x.pt", "--split", "nope"), "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_one_line_reason(args, message, tmp_path):
    r = run_cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr


def test_unknown_config_key_is_exit_2_naming_the_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("histroy_len: 10\n")
    r = run_cli("train", "--family", "point_goal", "--steps", "10", "--config", "bad.yaml", "--out", "x.pt",
                cwd=tmp_path)
    assert r.returncode == 2
    assert "histroy_len" in r.stderr


def test_corrupt_checkpoint_is_exit_2(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    r = run_cli("eval", "--checkpoint", "bad.pt", cwd=tmp_path)
    assert r.returncode == 2
    assert "bad.pt" in r.stderr


WRAPPED_ARM = """
import gymnasium
import numpy as np
from mql_ros.sim.families import ArmReachFamily


class _OneMoreValue(gymnasium.ObservationWrapper):
    def __init__(self, env):
        super().__init__(env)
        low, high = env.observation_space.low, env.observation_space.high
        self.observation_space = gymnasium.spaces.Box(np.append(low, -1.0).astype(np.float32),
                                                      np.append(high, 1.0).astype(np.float32))

    def observation(self, obs):
        return np.append(obs, 0.5).astype(np.float32)


class WrappedArm(ArmReachFamily):
    name = "arm_reach_wrapped"

    def make_env(self, task):
        return _OneMoreValue(super().make_env(task))


FAMILY = WrappedArm()
"""


def test_train_saves_a_family_that_wraps_the_arm_into_other_observations(tmp_path):
    """The arm's RobotSpec (12 observation values) was recorded for the 13-value agent, and the checkpoint
    was refused after the whole training run."""
    (tmp_path / "wrapped.py").write_text(WRAPPED_ARM)
    (tmp_path / "tiny.yaml").write_text("start_steps: 100\nhistory_len: 50\nhidden_sizes: [16, 16]\nbatch_size: 16\n")
    r = run_cli("train", "--family", "wrapped:FAMILY", "--steps", "150", "--config", "tiny.yaml", "--out", "arm.pt",
                "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", "--checkpoint", "arm.pt", "--family", "wrapped:FAMILY", "--tasks", "1", "--episodes", "1",
                "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["zero_shot"]["mean"] < 0
    # --init goes on training it: the checkpoint names its family "wrapped:FAMILY", not "arm_reach_wrapped"
    (tmp_path / "final.yaml").write_text("lr: 0.0001\n")
    r = run_cli("train", "--family", "wrapped:FAMILY", "--init", "arm.pt", "--steps", "20", "--config", "final.yaml",
                "--out", "arm2.pt", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--family", "arm_reach", "--init", "arm.pt", "--steps", "20", "--out", "arm3.pt",
                "--no-progress", cwd=tmp_path)
    assert r.returncode == 2 and "was trained on 'wrapped:FAMILY', not on 'arm_reach'" in r.stderr, r.stderr


def test_train_with_archive_then_adapt_and_verify_from_the_archive(tmp_path):
    (tmp_path / "tiny.yaml").write_text("start_steps: 100\nhistory_len: 50\nhidden_sizes: [16, 16]\nbatch_size: 16\n")
    r = run_cli("train", "--family", "arm_reach", "--steps", "150", "--config", "tiny.yaml", "--out", "arm.pt",
                "--archive", "archive", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = run_cli("archive", "verify", "archive", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 episodes, 150 transitions" in r.stdout
    r = run_cli("adapt", "--checkpoint", "arm.pt", "--archive", "archive", "--family", "arm_reach",
                "--task-index", "1", "--out", "adapted.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "archived transitions: 150" in r.stdout
    # the last bag as a writer killed before its summary leaves it: its data are kept and it is named
    last = sorted(p for p in (tmp_path / "archive").iterdir() if p.is_dir() and not p.name.startswith("."))[-1]
    cut_before_summary(last)
    r = run_cli("adapt", "--checkpoint", "arm.pt", "--archive", "archive", "--family", "arm_reach",
                "--task-index", "1", "--out", "adapted2.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "archived transitions: 150" in r.stdout
    assert f"mql-ros: warning: bag archive/{last.name}: 2 problem(s)" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- bad arguments, in-process
def run_main(capsys, *args: str) -> tuple[int, str]:
    """mql_ros.cli.main in this process: (exit status, stderr)."""
    from mql_ros.cli import main

    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _one_line_error(err: str, *words: str) -> None:
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("seed", [-1, 2**32])
@pytest.mark.parametrize("command", [
    ("train", "--family", "point_goal", "--steps", "10", "--out", "x.pt"),
    ("eval", "--checkpoint", "missing.pt"),
    ("adapt", "--checkpoint", "missing.pt", "--task-index", "0", "--out", "y.pt"),
    ("demo", "--checkpoint", "missing.pt"),
])
def test_seed_outside_0_to_2_32_minus_1_is_exit_2_for_every_command(capsys, tmp_path, monkeypatch, command, seed):
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(capsys, *command, "--seed", seed)
    assert rc == 2
    _one_line_error(err, f"--seed must be in 0..2**32-1, got {seed}")


def _must_not_run(*args, **kwargs):
    raise AssertionError("the work started although --out cannot be written")


@pytest.mark.parametrize("out, message", [
    ("a_directory", "--out a_directory is a directory"),
    ("a_file/sub/x.pt", "a_file is not a directory"),
])
def test_train_refuses_an_unwritable_out_before_training(capsys, tmp_path, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.training.meta_train", _must_not_run)
    (tmp_path / "a_directory").mkdir()
    (tmp_path / "a_file").write_text("")
    rc, err = run_main(capsys, "train", "--family", "point_goal", "--steps", "10", "--out", out)
    assert rc == 2
    _one_line_error(err, message)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write in any directory")
def test_train_refuses_an_out_in_a_directory_without_write_permission(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("mql_ros.core.training.meta_train", _must_not_run)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    rc, err = run_main(capsys, "train", "--family", "point_goal", "--steps", "10", "--out", locked / "x.pt")
    assert rc == 2
    _one_line_error(err, "no permission to write in")


def test_adapt_and_demo_refuse_an_unwritable_out_before_the_work(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.adaptation.adapt", _must_not_run)
    monkeypatch.setattr("mql_ros.core.training.evaluate", _must_not_run)
    (tmp_path / "a_directory.pt").mkdir()
    (tmp_path / "a_file").write_text("")
    rc, err = run_main(capsys, "adapt", "--checkpoint", tiny_checkpoint, "--task-index", "0", "--out",
                       "a_directory.pt")
    assert rc == 2
    _one_line_error(err, "--out a_directory.pt is a directory")
    rc, err = run_main(capsys, "demo", "--checkpoint", tiny_checkpoint, "--tasks", "1", "--out", "a_file")
    assert rc == 2
    _one_line_error(err, "--out a_file is not a directory")


@pytest.mark.parametrize("args, message", [
    (("eval", "--tasks", "-5"), "--tasks must be >= 0 (0: all), got -5"),
    (("eval", "--episodes", "0"), "--episodes must be >= 1, got 0"),
    (("demo", "--tasks", "0"), "--tasks must be >= 1, got 0"),
    (("demo", "--tasks", "-3"), "--tasks must be >= 1, got -3"),
    (("demo", "--tasks", "1", "--episodes", "0"), "--episodes must be >= 1, got 0"),
])
def test_eval_and_demo_refuse_negative_task_counts_and_no_episodes(capsys, tiny_checkpoint, tmp_path, monkeypatch,
                                                                   args, message):
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(capsys, *args, "--checkpoint", tiny_checkpoint)
    assert rc == 2
    _one_line_error(err, message)


def test_eval_of_an_empty_split_is_exit_2_naming_split_and_family(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    """It was exit 0 with a mean return of NaN (invalid JSON with --json)."""
    (tmp_path / "family_without_ood.py").write_text(
        "from mql_ros.sim.point import PointGoalFamily\nFAMILY = PointGoalFamily(n_ood=0)\n")
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(capsys, "eval", "--checkpoint", tiny_checkpoint, "--family", "family_without_ood:FAMILY",
                       "--split", "ood", "--episodes", "1", "--json")
    assert rc == 2
    _one_line_error(err, "split ood of family 'point_goal' has no tasks")


@pytest.mark.parametrize("command", [
    ("eval", "--tasks", "1", "--episodes", "1"),
    ("adapt", "--task-index", "0", "--out", "adapted.pt"),
])
def test_a_family_of_other_dims_than_the_checkpoint_is_refused_naming_both(capsys, tiny_checkpoint, tmp_path,
                                                                           monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(capsys, *command, "--checkpoint", tiny_checkpoint, "--family", "arm_reach")
    assert rc == 2
    _one_line_error(err, "family 'arm_reach' has obs/act dims 12/5", f"{tiny_checkpoint} was trained with 1/1")


# ------------------------------------------------------------------ files a run would overwrite or lose
@pytest.mark.parametrize("args, message", [
    (("--out", "model.png"), "--out model.png and its learning curve model.png are the same path"),
    (("--out", "same", "--archive", "same"), "--out same and --archive same are the same path"),
    (("--out", "run.pt", "--archive", "run.png"), "its learning curve run.png and --archive run.png"),
    (("--out", "pngdir.pt"), "--out pngdir.pt: pngdir.png, written beside it, is a directory"),
])
def test_train_refuses_an_out_whose_learning_curve_or_archive_would_overwrite_it(capsys, tmp_path, monkeypatch,
                                                                                  args, message):
    """`train --out model.png` wrote the checkpoint, then the learning curve over it (exit 0, checkpoint lost);
    `--out X --archive X` failed after training (the recorder had made X a directory)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.training.meta_train", _must_not_run)
    (tmp_path / "pngdir.png").mkdir()
    rc, err = run_main(capsys, "train", "--family", "point_goal", "--steps", "10", *args)
    assert rc == 2
    _one_line_error(err, message)
    assert not (tmp_path / "same").exists()


def test_adapt_refuses_an_out_that_is_its_checkpoint_even_through_a_symlink(capsys, tiny_checkpoint, tmp_path,
                                                                              monkeypatch):
    """The meta-trained checkpoint was replaced by the adapted one, exit 0."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.adaptation.adapt", _must_not_run)
    (tmp_path / "meta.pt").write_bytes(tiny_checkpoint.read_bytes())
    (tmp_path / "link.pt").symlink_to("meta.pt")
    for out in ("meta.pt", "link.pt", "./sub/../meta.pt"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        rc, err = run_main(capsys, "adapt", "--checkpoint", "meta.pt", "--task-index", "0", "--out", out)
        assert rc == 2
        _one_line_error(err, f"--out {out} and --checkpoint meta.pt are the same path")
    assert (tmp_path / "meta.pt").read_bytes() == tiny_checkpoint.read_bytes()


@pytest.mark.parametrize("out", ["/proc/x.pt", "/sys/x.pt"])
def test_an_out_where_no_file_can_be_created_is_refused_before_the_work_naming_out(capsys, tmp_path, monkeypatch,
                                                                                   out):
    """os.access said yes to root: the run failed only after training, naming a temp file (or exit 1)."""
    if not Path(out).parent.is_dir():
        pytest.skip(f"no {Path(out).parent} here")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.training.meta_train", _must_not_run)
    rc, err = run_main(capsys, "train", "--family", "point_goal", "--steps", "10", "--out", out)
    assert rc == 2
    _one_line_error(err, f"--out {out}: ", f"write in {Path(out).parent}")
    assert ".tmp" not in err and "mql-ros-write-probe" not in err
    rc, err = run_main(capsys, "demo", "--checkpoint", "missing.pt", "--out", str(Path(out).parent / "demo"))
    assert rc == 2
    _one_line_error(err, f"--out {Path(out).parent / 'demo'}: ")


# ------------------------------------------------------------------------------- repeated options
def test_repeated_adapt_set_and_bags_options_all_count():
    """argparse's default `store` kept only the last --adapt-set / --bags: archive_iters=7 was dropped, and a
    corrupt first --bags was never read."""
    from mql_ros.cli import build_parser

    args = build_parser().parse_args(["adapt", "--checkpoint", "c.pt", "--out", "o.pt", "--bags", "a", "b",
                                      "--bags", "c", "--adapt-set", "archive_iters=7", "--adapt-set",
                                      "new_task_iters=1", "proximal=ess"])
    assert args.bags == ["a", "b", "c"]
    assert args.adapt_set == ["archive_iters=7", "new_task_iters=1", "proximal=ess"]
    args = build_parser().parse_args(["eval", "--checkpoint", "c.pt", "--adapt-set", "lr=1e-4", "--adapt-set",
                                      "lr=3e-4"])
    assert args.adapt_set == ["lr=1e-4", "lr=3e-4"]
    assert build_parser().parse_args(["eval", "--checkpoint", "c.pt"]).adapt_set == []


@pytest.mark.parametrize("sets, message", [
    (("--adapt-set", "lr=.nan", "--adapt-set", "new_task_iters=1"), "adapt.lr: must be finite, got nan"),
    (("--adapt-set", "lr=1e-4", "lr=3e-4"), "--adapt-set gives lr more than once"),
    (("--adapt-set", "lr=1e-4", "--adapt-set", "lr=3e-4"), "--adapt-set gives lr more than once"),
])
def test_every_adapt_set_item_is_checked_and_a_key_given_twice_is_refused(capsys, tiny_checkpoint, tmp_path,
                                                                           monkeypatch, sets, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.adaptation.adapt", _must_not_run)
    rc, err = run_main(capsys, "adapt", "--checkpoint", tiny_checkpoint, "--task-index", "0", "--out", "o.pt", *sets)
    assert rc == 2
    _one_line_error(err, message)


# ----------------------------------------------------------------------------------------- bounds
@pytest.mark.parametrize("args, message", [
    (("eval", "--checkpoint", "missing.pt", "--threads", "32768"), "--threads must be in 1..256, got 32768"),
    (("eval", "--checkpoint", "missing.pt", "--threads", "2147483648"), "--threads must be in 1..256"),
    (("train", "--family", "point_goal", "--steps", "10", "--out", "x.pt", "--threads", "257"), "--threads"),
    (("eval", "--checkpoint", "x.pt", "--adapt", "--new-steps", "10000000000000000000000"),
     "--new-steps must be in 0..10_000_000"),
    (("adapt", "--checkpoint", "x.pt", "--task-index", "0", "--out", "o.pt", "--new-steps", "10000001"),
     "--new-steps must be in 0..10_000_000 (0: one episode), got 10000001"),
])
def test_absurd_threads_and_new_steps_are_exit_2_before_the_work(capsys, tiny_checkpoint, tmp_path, monkeypatch,
                                                                  args, message):
    """--threads 32768 segfaulted at exit (139) after the work; --new-steps 1e22 never ended."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.training.meta_train", _must_not_run)
    monkeypatch.setattr("mql_ros.core.training.evaluate", _must_not_run)
    rc, err = run_main(capsys, *(str(tiny_checkpoint) if a == "x.pt" else a for a in args))
    assert rc == 2
    _one_line_error(err, message)


# ---------------------------------------------------------------------------------------- messages
HUGE_AND_NAN = """
import gymnasium
import numpy as np
from mql_ros.sim.point import PointGoalFamily


class _Reward(gymnasium.Wrapper):
    def __init__(self, env, value):
        super().__init__(env)
        self.value = value

    def step(self, action):
        obs, _, terminated, truncated, info = self.env.step(action)
        return obs, self.value, terminated, truncated, info


class HugeReward(PointGoalFamily):  # -3e38 is finite in float32, 20 of them summed in float32 are not
    def make_env(self, task):
        return _Reward(super().make_env(task), -3e38)


class NanOnTest(PointGoalFamily):
    def make_env(self, task):
        env = super().make_env(task)
        return _Reward(env, float("nan")) if task in self.test_tasks() else env
"""


def test_eval_errors_name_the_task_by_its_split(capsys, tiny_checkpoint, tmp_path, monkeypatch):
    """Errors named the task point_goal/eval/0 whatever the split."""
    (tmp_path / "fams.py").write_text(HUGE_AND_NAN)
    monkeypatch.chdir(tmp_path)
    rc, err = run_main(capsys, "eval", "--checkpoint", tiny_checkpoint, "--family", "fams:NanOnTest", "--split",
                       "test", "--tasks", "1", "--episodes", "1", "--json")
    assert rc == 2
    _one_line_error(err, "task 'point_goal/test/0'")
    assert "/eval/" not in err


def test_eval_sums_rewards_too_large_for_a_float32_sum_into_a_finite_json_return(capsys, tiny_checkpoint, tmp_path,
                                                                                 monkeypatch):
    """Each reward -3e38 is finite in float32, their float32 sum is -inf: `eval --json` printed -Infinity (not
    JSON), later refused it. Returns are float64 sums now (Episode.total_reward), a finite number."""
    from mql_ros.cli import main

    (tmp_path / "fams.py").write_text(HUGE_AND_NAN)
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", "--checkpoint", str(tiny_checkpoint), "--family", "fams:HugeReward", "--split", "test",
               "--tasks", "1", "--episodes", "1", "--json"])
    out = capsys.readouterr().out
    assert rc == 0, out
    mean = json.loads(out.strip().splitlines()[-1])["zero_shot"]["mean"]
    assert mean == pytest.approx(20 * float(np.float32(-3e38)), rel=1e-12)  # point_goal: 20 steps an episode
@pytest.mark.parametrize("args, message", [
    (("eval", "--checkpoint", "adir.pt"), "checkpoint adir.pt is a directory"),
    (("adapt", "--checkpoint", "adir.pt", "--task-index", "0", "--out", "o.pt"), "checkpoint adir.pt is a directory"),
    (("archive", "info", ".", "--checkpoint", "adir.pt"), "checkpoint adir.pt is a directory"),
    (("train", "--family", "point_goal", "--steps", "10", "--out", "x.pt", "--archive", ""), "--archive is empty"),
    (("train", "--family", "point_goal", "--steps", "10", "--out", "x.pt", "--init", ""), "--init is empty"),
    (("eval", "--checkpoint", "x.pt", "--adapt", "--archive", ""), "--archive is empty"),
    (("eval", "--checkpoint", "x.pt", "--family", ""), "--family is empty"),
    (("demo", "--checkpoint", ""), "--checkpoint is empty"),
    (("train", "--family", "exits:FAMILY", "--steps", "10", "--out", "x.pt"),
     "task family 'exits:FAMILY': module 'exits' raised SystemExit(3)"),
])
def test_a_directory_checkpoint_an_empty_path_and_a_module_exiting_on_import_are_one_line_exit_2(
        capsys, tiny_checkpoint, tmp_path, monkeypatch, args, message):
    """They said "no such file", were silently ignored (`--archive ''` recorded nothing), and ended the CLI
    with the module's exit status and no message."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.training.meta_train", _must_not_run)
    monkeypatch.setattr("mql_ros.core.training.evaluate", _must_not_run)
    (tmp_path / "adir.pt").mkdir()
    (tmp_path / "exits.py").write_text("raise SystemExit(3)\n")
    rc, err = run_main(capsys, *(str(tiny_checkpoint) if a == "x.pt" else a for a in args))
    assert rc == 2
    _one_line_error(err, message)


def test_train_init_refuses_a_learning_curve_it_cannot_continue_before_training(capsys, tiny_checkpoint, tmp_path,
                                                                                monkeypatch):
    """A hand-edited extra.curve failed `train --init` after the whole training run, exit 1."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.training.meta_train", _must_not_run)
    payload = torch.load(tiny_checkpoint, weights_only=True)
    for curve, message in (("notalist", "extra.curve must be a list"),
                           ([{"mean_return": -1.0}], "extra.curve[0] is not a learning-curve entry")):
        torch.save({**payload, "extra": {"curve": curve}}, tmp_path / "bad.pt")
        rc, err = run_main(capsys, "train", "--family", "point_goal", "--steps", "10", "--init", "bad.pt",
                           "--out", "x.pt")
        assert rc == 2
        _one_line_error(err, "checkpoint bad.pt: ", message)


# --------------------------------------------------------------------- train --archive and adapt on it
@pytest.fixture(scope="module")
def point_archive(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, archive) of a tiny point_goal run recorded with --archive."""
    out = tmp_path_factory.mktemp("cli_archive")
    (out / "tiny.yaml").write_text(TINY)
    r = run_cli("train", "--family", "point_goal", "--steps", "300", "--config", "tiny.yaml", "--out", "point.pt",
                "--archive", "archive", "--no-progress", cwd=out)
    assert r.returncode == 0, r.stderr
    return out / "point.pt", out / "archive"


def test_adapt_that_uses_no_archive_data_says_so_and_why(point_archive, tmp_path):
    """Every task of the new-task bags was in the archive too: no archive data, "propensity accuracy: nan",
    exit 0 and no word about it."""
    ckpt, archive = point_archive
    r = run_cli("adapt", "--checkpoint", str(ckpt), "--archive", str(archive), "--bags", str(archive),
                "--out", str(tmp_path / "a.pt"), "--adapt-set", "new_task_iters=2", "archive_iters=2")
    assert r.returncode == 0, r.stderr
    assert "archived transitions: 0" in r.stdout
    warnings = [line for line in r.stderr.splitlines() if "no archive data used" in line]
    assert len(warnings) == 1 and f"every task in {archive}" in warnings[0] and "also in the new-task data" in \
        warnings[0], r.stderr


def test_train_refuses_to_append_to_an_archive_of_another_family_or_encoding_naming_both(
        capsys, point_archive, tmp_path, monkeypatch):
    """The bags were appended, and the archive then failed `archive verify` under either encoding."""
    _, archive = point_archive
    bags = sorted(p.name for p in archive.iterdir())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mql_ros.core.training.meta_train", _must_not_run)
    rc, err = run_main(capsys, "train", "--family", "arm_reach", "--steps", "10", "--out", "x.pt", "--archive", archive)
    assert rc == 2
    _one_line_error(err, f"--archive {archive} holds episodes of family 'point_goal'", "of family 'arm_reach'")
    (tmp_path / "wider.py").write_text(
        WRAPPED_ARM.replace("from mql_ros.sim.families import ArmReachFamily", "from mql_ros.sim.point import "
                            "PointGoalFamily").replace("WrappedArm(ArmReachFamily)", "WrappedArm(PointGoalFamily)")
        .replace('name = "arm_reach_wrapped"', 'name = "point_goal"'))
    rc, err = run_main(capsys, "train", "--family", "wider:FAMILY", "--steps", "10", "--out", "x.pt", "--archive",
                       archive)
    assert rc == 2
    _one_line_error(err, f"--archive {archive} holds bags of another encoding", "joints obs_0)", "joints obs_0, obs_1")
    assert sorted(p.name for p in archive.iterdir()) == bags
    # the same family and encoding appends, as before
    monkeypatch.setattr("mql_ros.core.training.meta_train", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, err = run_main(capsys, "train", "--family", "point_goal", "--steps", "10", "--out", "x.pt", "--archive",
                       archive)
    assert rc == 1 and "interrupted" in err


def _start_and_signal(tmp_path: Path, signals: list[tuple[float, int]]) -> subprocess.CompletedProcess:
    """`train --archive` in a subprocess, signalled (delay after the previous signal, signal) once its first
    bag is finished and the second one is being filled. SIGINT is reset to its default in the child: one
    started from a non-interactive shell's background job inherits it ignored."""
    import signal
    import time

    (tmp_path / "tiny.yaml").write_text(TINY)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "mql_ros.cli", "train", "--family", "point_goal", "--steps", "100000",
                          "--config", "tiny.yaml", "--out", "x.pt", "--archive", "archive", "--no-progress"],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not list((tmp_path / "archive").glob("*/metadata.yaml")) and p.poll() is None:
            assert time.monotonic() < deadline, "no bag finished in 120 s"
            time.sleep(0.01)
        time.sleep(0.3)
        for delay, sig in signals:
            time.sleep(delay)
            p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("signals", [[(0, 15)], [(0, 2), (0.002, 2)], [(0, 15), (0.005, 15)]],
                         ids=["SIGTERM", "SIGINT-twice", "SIGTERM-twice"])
def test_train_archive_stopped_by_sigterm_or_two_sigints_exits_1_and_every_bag_verifies(tmp_path, signals):
    """SIGTERM killed the run at once (rc -15, the open bag a 0-byte .mcap without metadata.yaml); a second
    SIGINT during the recorder's close left the open bag without metadata.yaml. Both failed `archive verify`."""
    r = _start_and_signal(tmp_path, signals)
    assert r.returncode == 1, (r.returncode, r.stderr)
    _one_line_error(r.stderr, "mql-ros train: interrupted")
    bags = [p for p in (tmp_path / "archive").iterdir() if not p.name.startswith(".")]
    assert len(bags) >= 2 and all((b / "metadata.yaml").is_file() for b in bags), bags
    v = run_cli("archive", "verify", "archive", "--family", "point_goal", cwd=tmp_path)
    assert v.returncode == 0, v.stdout
    assert f"{len(bags)} bags, {len(bags)} without problems" in v.stdout
    assert not (tmp_path / "x.pt").exists()
