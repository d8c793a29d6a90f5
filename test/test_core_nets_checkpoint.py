"""Checkpoints round-trip bit-exactly; every bad file is a CheckpointError naming it; DeployedPolicy = torch."""

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mql_ros.core.checkpoint import (
    CHECKPOINT_VERSION,
    agent_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from mql_ros.core.config import MQLConfig, continued_config, load_config
from mql_ros.core.episode import Episode
from mql_ros.core.errors import CheckpointError, InputError
from mql_ros.core.replay import episodes_to_batch
from mql_ros.core.robot import RobotSpec
from mql_ros.core.runtime import DeployedPolicy
from mql_ros.core.td3 import TD3Context
from mql_ros.core.training import meta_train

torch.set_num_threads(1)
ROBOT = RobotSpec(("j1", "j2"), ("finger",), (-1.0, -2.0), (1.0, 2.0), 0.0, 0.04)  # obs 6, act 3
CFG = MQLConfig(history_len=6, context_dim=4, hidden_sizes=(16, 16))


def _trained_agent(cfg=CFG):
    agent = TD3Context(cfg, ROBOT.obs_dim, ROBOT.act_dim, seed=1)
    rng = np.random.default_rng(0)
    ep = Episode("t", rng.normal(size=(9, ROBOT.obs_dim)), rng.uniform(-1, 1, (8, ROBOT.act_dim)),
                 rng.normal(size=8))
    batch = episodes_to_batch([ep], cfg.history_len)
    for _ in range(2):
        agent.update(batch)
    return agent, ep


def _flat(state, prefix=""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            yield from _flat(v, f"{prefix}/{i}")


def test_round_trip_is_bit_exact_with_metadata(tmp_path):
    agent, _ = _trained_agent()
    path = tmp_path / "a.pt"
    sha = save_checkpoint(path, agent, "arm_reach", ROBOT, extra={"curve": [1.0, 2.0]})
    ckpt = load_checkpoint(path, expect_obs_dim=ROBOT.obs_dim, expect_act_dim=ROBOT.act_dim,
                           expect_robot=ROBOT)
    assert ckpt.sha256 == sha and ckpt.version == CHECKPOINT_VERSION
    assert ckpt.config == CFG and ckpt.family == "arm_reach" and ckpt.robot == ROBOT
    assert ckpt.extra == {"curve": [1.0, 2.0]}
    loaded = dict(_flat(agent_from_checkpoint(ckpt).state_dict()))
    for name, t in _flat(agent.state_dict()):
        assert torch.equal(loaded[name], t), name
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temp file


def _save_payload(path, payload):
    torch.save(payload, path)
    return path


@pytest.fixture
def good(tmp_path):
    agent, _ = _trained_agent()
    path = tmp_path / "good.pt"
    save_checkpoint(path, agent, "arm_reach", ROBOT)
    return path, torch.load(path, weights_only=True)


def _edited(tmp_path, payload, **changes):
    return _save_payload(tmp_path / "bad.pt", {**payload, **changes})


def test_missing_truncated_and_foreign_files_are_checkpoint_errors(tmp_path, good):
    path, _ = good
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt")
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    _save_payload(tmp_path / "list.pt", [1, 2])
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


@pytest.mark.parametrize("change, message", [
    ({"version": 99}, "unknown version 99"),
    ({"config": {"history_len": 6, "bogus": 1}}, "bogus"),
    ({"obs_dim": 7}, "robot spec dims"),
    ({"robot": {"arm_joints": ["a"]}}, "invalid robot spec"),
])
def test_inconsistent_contents_are_checkpoint_errors(tmp_path, good, change, message):
    _, payload = good
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_edited(tmp_path, payload, **change))


def test_missing_keys_non_finite_and_misfitting_weights_are_checkpoint_errors(tmp_path, good):
    _, payload = good
    broken = {k: v for k, v in payload.items() if k != "weights"}
    with pytest.raises(CheckpointError, match="missing keys \\['weights'\\]"):
        load_checkpoint(_save_payload(tmp_path / "m.pt", broken))
    nets = dict(payload["weights"]["nets"])
    name = next(iter(nets))
    nets[name] = torch.full_like(nets[name], float("nan"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(_edited(tmp_path, payload, weights={**payload["weights"], "nets": nets}))
    other = {**payload["config"], "hidden_sizes": [8, 8]}
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(_edited(tmp_path, payload, config=other))


def test_expectations_that_do_not_match_are_checkpoint_errors(good):
    path, _ = good
    with pytest.raises(CheckpointError, match="obs_dim is 6, expected 5"):
        load_checkpoint(path, expect_obs_dim=5)
    other = replace(ROBOT, arm_joints=("j1", "elbow"))
    with pytest.raises(CheckpointError, match="another robot: arm_joints"):
        load_checkpoint(path, expect_robot=other)
    with pytest.raises(CheckpointError, match="good.pt"):
        DeployedPolicy.from_checkpoint(path, expect_robot=other)


def test_failed_save_keeps_the_previous_file(tmp_path, good):
    path, _ = good
    before = path.read_bytes()
    agent, _ = _trained_agent()
    with pytest.raises(InputError):
        save_checkpoint(path, agent, "x", RobotSpec(("a",), ("finger",), (-1.0,), (1.0,), 0.0, 1.0))
    assert path.read_bytes() == before


@pytest.mark.parametrize("variant", [{}, {"shared_encoder": True}, {"use_context": False}])
def test_deployed_policy_equals_the_torch_agent(tmp_path, variant):
    cfg = replace(CFG, history_len=5, **variant)
    agent, ep = _trained_agent(cfg)
    path = tmp_path / "p.pt"
    save_checkpoint(path, agent, "arm_reach", ROBOT)
    policy = DeployedPolicy.from_checkpoint(path, expect_robot=ROBOT)
    assert policy.context_dim == (cfg.context_dim if cfg.use_context else 0)
    assert policy.sha256 == load_checkpoint(path).sha256
    ctx, ref = policy.new_context(), agent.streaming_context()
    z, z_ref = ctx.context, ref.context
    for k in range(len(ep)):  # 8 steps > H = 5: the recomputed window too
        np.testing.assert_allclose(policy.act(ep.observations[k], z), agent.act(ep.observations[k], z_ref),
                                   atol=1e-5)
        z = ctx.push(ep.observations[k], ep.actions[k], ep.rewards[k])
        z_ref = ref.push(ep.observations[k], ep.actions[k], ep.rewards[k])
    batch = episodes_to_batch([ep], cfg.history_len)
    np.testing.assert_allclose(z, agent.contexts(batch.next_hist, batch.next_hist_len)[-1].numpy(), atol=1e-5)
    with pytest.raises(InputError):
        policy.act(np.full(ROBOT.obs_dim, np.nan), z)
    with pytest.raises(InputError):
        policy.act(np.zeros(ROBOT.obs_dim), np.zeros(cfg.context_dim + 1))


def test_a_version_1_checkpoint_loads_with_unit_input_scales(tmp_path):
    agent, ep = _trained_agent()
    agent.set_context_input_scale(np.full(ROBOT.obs_dim + ROBOT.act_dim + 1, 3.0))
    path = tmp_path / "v2.pt"
    save_checkpoint(path, agent, "arm_reach", ROBOT)
    assert load_checkpoint(path).weights["nets"]["critic_encoder.input_scale"][0] == 3.0
    payload = torch.load(path, weights_only=True)
    payload["version"] = 1  # written before encoders had an input scale
    for part in ("nets", "targets"):
        payload["weights"][part] = {k: v for k, v in payload["weights"][part].items()
                                    if not k.endswith("input_scale")}
    old = tmp_path / "v1.pt"
    torch.save(payload, old)
    loaded = agent_from_checkpoint(load_checkpoint(old))
    for nets in (loaded.nets, loaded.targets):
        assert torch.equal(nets["critic_encoder"].input_scale, torch.ones(ROBOT.obs_dim + ROBOT.act_dim + 1))


def test_shipped_checkpoint_holds_the_config_of_its_documented_training_commands():
    """README: `mql-ros train ... --config config/arm_reach_train.yaml`, then `mql-ros train --init ... --config
    config/arm_reach_final.yaml`, reproduce checkpoints/arm_reach.pt."""
    root = Path(__file__).resolve().parents[1]
    shipped = load_checkpoint(root / "checkpoints" / "arm_reach.pt")
    assert shipped.family == "arm_reach"
    base = load_config(root / "config" / "arm_reach_train.yaml")
    assert shipped.config == continued_config(base, root / "config" / "arm_reach_final.yaml")
    # continued from the 100k-step checkpoint that the first command made (the one shipped before, README)
    assert shipped.extra["init"]["sha256"].startswith("c011d43b7659") and shipped.extra["init"]["steps"] == 100000
    assert "--config config/arm_reach_final.yaml" in shipped.extra["command"]


def test_the_documented_first_training_command_repeats_the_shipped_learning_curve_through_step_6000():
    """The README's first command (seed 0, config/arm_reach_train.yaml) is where the shipped checkpoint starts,
    and its stored learning curve begins with that run's. The random-action phase (the first 5000 steps) runs
    through no learned network, so its returns must repeat on any machine (to 1e-6 relative: the stored
    curve summed episodes in float32, 1.2e-8 off the float64 sum); the first 1000 steps of updates depend on
    the CPU's floating-point paths (bit for bit on the machine that made the checkpoint, 0.0011 of return off
    at step 6000 on an AVX-512 Xeon, README "Bit-for-bit only on the same kind of machine"), so they must
    repeat within 0.05. A change to the training code, its seeding or the
    configuration's defaults moves them by far more."""
    root = Path(__file__).resolve().parents[1]
    stored = {e["step"]: e for e in load_checkpoint(root / "checkpoints" / "arm_reach.pt").extra["curve"]}
    cfg = load_config(root / "config" / "arm_reach_train.yaml")
    _, curve = meta_train("arm_reach", cfg, 6000, seed=0, progress=False)
    assert [e["step"] for e in curve] == [1000, 2000, 3000, 4000, 5000, 6000]
    for entry in curve[:5]:  # the stored curve summed each episode in float32, a return now sums in float64
        assert entry["mean_return"] == pytest.approx(stored[entry["step"]]["mean_return"], rel=1e-6, abs=0), \
            entry["step"]
    assert curve[5]["updates"] == stored[6000]["updates"]
    assert curve[5]["mean_return"] == pytest.approx(stored[6000]["mean_return"], abs=0.05)


def test_weights_of_the_wrong_shape_name_the_tensor_and_both_shapes_on_one_line(tmp_path, good):
    _, payload = good
    nets = {**payload["weights"]["nets"], "actor.net.0.weight": torch.zeros(3, 3)}
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_edited(tmp_path, payload, weights={**payload["weights"], "nets": nets}))
    message = str(err.value)
    assert "size mismatch for actor.net.0.weight: (3, 3) in the checkpoint, (" in message
    assert "\n" not in message


@pytest.mark.parametrize("value, message", [
    (0.0, "need 10 finite positive values, got [1, 0, 1"),
    (-2.0, "need 10 finite positive values, got [1, -2, 1"),
    (float("inf"), "contain NaN or inf: critic_encoder.input_scale"),
])
def test_a_zero_negative_or_non_finite_context_input_scale_is_a_checkpoint_error_naming_it(tmp_path, good, value,
                                                                                           message):
    _, payload = good
    for part in ("nets", "targets"):
        payload["weights"][part]["critic_encoder.input_scale"][1] = value
    with pytest.raises(CheckpointError, match="input_scale") as err:
        load_checkpoint(_edited(tmp_path, payload))
    assert message in str(err.value)


def test_a_config_asking_for_huge_layers_is_refused_before_any_network_is_allocated(tmp_path, good):
    _, payload = good
    huge = {**payload["config"], "hidden_sizes": [2**24] * len(payload["config"]["hidden_sizes"])}  # ~1 PiB
    with pytest.raises(CheckpointError, match="do not fit the checkpoint's config: nets: size mismatch for "
                                              "actor.net.0.weight: .* in the checkpoint, .16777216, "):
        load_checkpoint(_edited(tmp_path, payload, config=huge))
    beyond = {**payload["config"], "hidden_sizes": [2**40], "context_dim": 2**40}
    with pytest.raises(CheckpointError, match="its config builds no networks"):
        load_checkpoint(_edited(tmp_path, payload, config=beyond))


def test_an_optimizer_state_of_the_wrong_kind_is_a_checkpoint_error(tmp_path, good):
    _, payload = good
    weights = {**payload["weights"], "actor_opt": {**payload["weights"]["actor_opt"], "state": 5}}
    with pytest.raises(CheckpointError, match="weights do not fit the checkpoint's config: 'int' object"):
        load_checkpoint(_edited(tmp_path, payload, weights=weights))


def test_the_sha256_is_of_the_bytes_loaded_even_when_the_file_is_replaced_meanwhile(tmp_path, good, monkeypatch):
    path, payload = good
    other = _edited(tmp_path, payload, extra={"note": "another file"})
    original_bytes = path.read_bytes()
    import mql_ros.core.checkpoint as checkpoint_module

    real_load = checkpoint_module.torch.load

    def load_then_replace(f, *args, **kwargs):  # the file changes between reading and hashing
        result = real_load(f, *args, **kwargs)
        os.replace(other, path)
        return result

    monkeypatch.setattr(checkpoint_module.torch, "load", load_then_replace)
    ckpt = load_checkpoint(path)
    assert ckpt.sha256 == hashlib.sha256(original_bytes).hexdigest()
    assert "note" not in ckpt.extra


@pytest.mark.parametrize("extra, message", [
    ({"curve": "notalist"}, "extra.curve must be a list, got str 'notalist'"),
    ({"curve": [{"step": "x", "seconds": 1.0}]}, r"extra.curve\[0\].step must be a number"),
    ({"curve": [["step", 1]]}, r"extra.curve\[0\] must be a learning-curve entry"),
    ({"steps": "100"}, "extra.steps must be an integer"),
    ({"init": [1]}, "extra.init must be a mapping"),
    ({"report": None}, "extra.report must be a mapping"),
])
def test_known_extra_keys_of_the_wrong_type_are_checkpoint_errors_naming_the_key(tmp_path, good, extra, message):
    """A hand-edited extra.curve loaded, and `train --init` failed on it after the whole training run."""
    _, payload = good
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(_edited(tmp_path, payload, extra=extra))
    # keys the package does not know are kept as they are
    assert load_checkpoint(_edited(tmp_path, payload, extra={"note": [1, "x"]})).extra == {"note": [1, "x"]}
