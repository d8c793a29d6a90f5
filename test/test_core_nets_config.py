"""Config loading is strict: unknown keys, out-of-range values and wrong types name the key."""

import pytest

from mql_ros.core.config import AdaptConfig, MQLConfig, continued_config, load_config
from mql_ros.core.errors import ConfigError


def test_defaults_fit_a_whole_arm_episode_in_the_context_window():
    cfg = MQLConfig()
    assert cfg.history_len >= 50 and cfg.adapt == AdaptConfig()


def test_round_trip_through_dict_and_yaml(tmp_path):
    cfg = MQLConfig(history_len=60, hidden_sizes=(32, 32), adapt=AdaptConfig(proximal="fixed"))
    assert MQLConfig.from_dict(cfg.to_dict()) == cfg
    path = tmp_path / "c.yaml"
    path.write_text("history_len: 60\nhidden_sizes: [32, 32]\nadapt:\n  proximal: fixed\n")
    assert load_config(path) == cfg


def test_overrides_merge_into_the_nested_adapt_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adapt:\n  archive_iters: 7\n")
    cfg = load_config(path, overrides={"batch_size": 32, "adapt": {"lr": 1e-3}})
    assert (cfg.batch_size, cfg.adapt.archive_iters, cfg.adapt.lr) == (32, 7, 1e-3)


def test_command_line_adapt_overrides_read_yaml_scalars_and_scientific_notation():
    cfg = AdaptConfig().with_overrides(["archive_iters=400", "lr=1e-3", "proximal=ess", "use_propensity=false"])
    assert (cfg.archive_iters, cfg.lr, cfg.proximal, cfg.use_propensity) == (400, 1e-3, "ess", False)
    assert AdaptConfig().with_overrides([]) == AdaptConfig()


def test_an_unquoted_off_selects_no_proximal_term_from_a_file_and_the_command_line(tmp_path):
    """YAML 1.1 (PyYAML) reads `off` as false; the documented choice must still work where it is written."""
    path = tmp_path / "c.yaml"
    path.write_text("adapt:\n  proximal: off\n")
    assert load_config(path).adapt.proximal == "off"
    assert AdaptConfig().with_overrides(["proximal=off"]).proximal == "off"
    with pytest.raises(ConfigError, match="proximal=True"):
        AdaptConfig().with_overrides(["proximal=on"])


def test_a_continued_run_takes_the_base_config_and_changes_only_the_keys_its_file_names(tmp_path):
    base = MQLConfig(context_dim=64, gamma=0.95, adapt=AdaptConfig(archive_iters=7))
    path = tmp_path / "final.yaml"
    path.write_text("lr: 0.0001\nexpl_noise: 0.05\nadapt:\n  lr: 0.001\n")
    cfg = continued_config(base, path)
    assert (cfg.lr, cfg.expl_noise, cfg.adapt.lr) == (1e-4, 0.05, 1e-3)
    assert (cfg.context_dim, cfg.gamma, cfg.adapt.archive_iters) == (64, 0.95, 7)
    assert continued_config(base, None) == base


def test_a_continued_run_refuses_a_config_that_reshapes_the_networks(tmp_path):
    path = tmp_path / "final.yaml"
    path.write_text("context_dim: 30\nhidden_sizes: [256, 256]\nlr: 0.0001\n")
    with pytest.raises(ConfigError, match=r"context_dim \(64 -> 30\)") as err:
        continued_config(MQLConfig(context_dim=64), path)
    assert "hidden_sizes" not in str(err.value)  # unchanged from the base: not named


@pytest.mark.parametrize("item, message", [
    ("archive_iters", "expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("archive_itters=400", r"unknown config key\(s\) \['archive_itters'\]"),
    ("archive_iters=-1", "archive_iters"),
    ("proximal=sometimes", "proximal"),
    ("lr=nan", "lr"),
])
def test_bad_command_line_adapt_overrides_name_the_item(item, message):
    with pytest.raises(ConfigError, match=message):
        AdaptConfig().with_overrides([item])


@pytest.mark.parametrize("d, message", [
    ({"histroy_len": 5}, r"unknown config key\(s\) \['histroy_len'\]; valid keys: \['history_len'"),
    ({"adapt": {"beta": 1}}, r"adapt: unknown config key\(s\) \['beta'\]; valid keys: \['use_propensity'"),
])
def test_unknown_keys_are_named_with_the_valid_ones(d, message):
    with pytest.raises(ConfigError, match=message):
        MQLConfig.from_dict(d)


@pytest.mark.parametrize("d, message", [
    ({"gamma": 1.5}, r"gamma=1.5 is out of range \[0, 1\]"),
    ({"tau": 0}, r"tau=0.0 is out of range \(0, 1\]"),
    ({"batch_size": 0}, r"batch_size=0 is out of range \[1, inf\)"),
    ({"lr": float("nan")}, "lr: must be finite"),
    ({"hidden_sizes": [64, -1]}, r"hidden_sizes\[1\]=-1 is out of range"),
    ({"adapt": {"beta_clip": -1}}, r"adapt.beta_clip=-1.0 is out of range \(0, 20\]"),
    ({"adapt": {"proximal": "sometimes"}},
     r"adapt.proximal='sometimes' is not one of \['ess', 'fixed', 'off'\]"),
])
def test_out_of_range_values_name_the_key_and_the_range(d, message):
    with pytest.raises(ConfigError, match=message):
        MQLConfig.from_dict(d)


@pytest.mark.parametrize("d, message", [
    ({"history_len": "50"}, "history_len: expected an integer, got str"),
    ({"history_len": 2.5}, "history_len: expected an integer"),
    ({"use_context": "yes"}, "use_context: expected true or false"),
    ({"hidden_sizes": 256}, "hidden_sizes: expected a non-empty list"),
    ({"adapt": [1]}, "adapt: expected a mapping"),
    ({"adapt": {"use_archive": 1}}, "adapt.use_archive: expected true or false"),
])
def test_wrong_types_are_errors(d, message):
    with pytest.raises(ConfigError, match=message):
        MQLConfig.from_dict(d)


def test_unreadable_or_non_mapping_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad)


@pytest.mark.parametrize("item, problem", [
    ("lr=[1", "line 1, column 3: expected ',' or ']', but got '<stream end>'"),
    ("proximal=*x", "found undefined alias 'x'"),
    ("lr={a: 1, a: 2}", "found duplicate key 'a'"),
])
def test_malformed_yaml_in_a_command_line_adapt_override_is_one_line_naming_the_override(item, problem):
    with pytest.raises(ConfigError) as err:
        AdaptConfig().with_overrides([item])
    message = str(err.value)
    assert message.startswith(f"adapt override {item!r}: the value is not valid YAML") and problem in message
    assert "\n" not in message


def test_a_config_file_that_is_not_utf8_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=f"config file {path} is not UTF-8 text"):
        load_config(path)


def test_invalid_yaml_in_a_config_file_is_one_line_with_the_file_line_column_and_problem(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("history_len: 60\nlr: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"config file {path} is not valid YAML: line 3, column 1: expected ',' or ']', but got "
                              f"'<stream end>' (while parsing a flow sequence at line 2, column 5)")


@pytest.mark.parametrize("text, key, line", [
    ("lr: 0.001\nbatch_size: 32\nlr: 0.5\n", "lr", 3),
    ("{lr: 0.001, lr: 0.5}\n", "lr", 1),
    ("adapt:\n  archive_iters: 7\n  lr: 0.001\n  archive_iters: 400\n", "archive_iters", 4),
])
def test_a_key_given_twice_in_a_config_file_is_a_config_error_naming_the_key(tmp_path, text, key, line):
    """PyYAML keeps the last value silently; the run would use a value its user may not have meant."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}.*line {line}, column \d+: found duplicate key '{key}'"):
        load_config(path)
    with pytest.raises(ConfigError, match=f"duplicate key '{key}'"):
        continued_config(MQLConfig(), path)


def test_keys_merged_in_with_a_yaml_merge_key_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("adapt:\n  <<: {lr: 0.001, archive_iters: 7}\n  lr: 0.002\n")
    assert (load_config(path).adapt.lr, load_config(path).adapt.archive_iters) == (0.002, 7)



@pytest.mark.parametrize("text, value", [("1e-3", 1e-3), ("3E-4", 3e-4), ("+5e-4", 5e-4), ("1.0e-3", 1e-3)])
def test_yaml_1_2_floats_without_a_dot_like_1e_3_are_read_as_floats(tmp_path, text, value):
    """PyYAML's YAML 1.1 resolver read `lr: 1e-3` as the string '1e-3', refused ("expected a number, got
    str"), while `--adapt-set lr=1e-3` was accepted: the file and the command line now read it alike."""
    path = tmp_path / "c.yaml"
    path.write_text(f"lr: {text}\nadapt:\n  lr: {text}\n")
    cfg = load_config(path)
    assert (cfg.lr, cfg.adapt.lr) == (value, value)
    assert AdaptConfig().with_overrides([f"lr={text}"]).lr == value


def test_yaml_1_2_floats_with_an_unsigned_exponent_or_no_dot_are_numbers_checked_by_range(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("start_steps: 1e4\nreplay_size: 1.0e5\n")  # a whole number is fine for an integer key
    cfg = load_config(path)
    assert (cfg.start_steps, cfg.replay_size) == (10_000, 100_000)
    path.write_text("lr: 5E+2\n")
    with pytest.raises(ConfigError, match=r"lr=500.0 is out of range"):
        load_config(path)
    path.write_text("lr: 1e\n")  # not a number in any YAML: still the string, refused as before
    with pytest.raises(ConfigError, match="lr: expected a number, got str '1e'"):
        load_config(path)
