"""config/mql.yaml and the nodes' declared parameters agree, both ways, and the file is accepted as is."""

from __future__ import annotations

import importlib

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")

from rclpy.parameter import Parameter  # noqa: E402
from rosgraph_helpers import ROOT  # noqa: E402

from mql_ros.core.errors import ConfigError  # noqa: E402

CONFIG = ROOT / "config" / "mql.yaml"
# Declared by rclpy itself, or by nodes.common.declare_robot (documented in the file's header).
COMMON = {"use_sim_time", "start_type_description_service", "robot_description", "arm_joints",
          "gripper_joints"}
# sim_arm's task.* parameters take the values of the task family/split/index select: in the file they would
# override every selected task (the file's comment names them instead).
NOT_IN_FILE = {"sim_arm": {"task.target", "task.payload_mass", "task.damping_scale", "task.friction_scale"}}
NODES = {"sim_arm": "SimArmNode", "policy": "PolicyNode", "context_encoder": "ContextEncoderNode",
         "adaptation": "AdaptationNode"}


def make_node(name: str, context, overrides: list[Parameter] | None = None):
    try:
        module = importlib.import_module(f"mql_ros.nodes.{name}")
    except ImportError as exc:  # a core module the node wraps is not there yet
        pytest.skip(f"mql_ros.nodes.{name} cannot be imported: {exc}")
    args = ["--ros-args", "--params-file", str(CONFIG)]
    return getattr(module, NODES[name])(context=context, cli_args=args, parameter_overrides=overrides or [])


@pytest.mark.parametrize("name", list(NODES))
def test_config_lists_exactly_the_parameters_each_node_declares(name, ros_context, tiny_checkpoint):
    section = yaml.safe_load(CONFIG.read_text())[f"/**/{name}"]["ros__parameters"]
    node = make_node(name, ros_context, [Parameter("checkpoint", value=str(tiny_checkpoint))]
                     if "checkpoint" in section else [])
    try:
        declared = set(node._parameters) - COMMON - NOT_IN_FILE.get(name, set())
        assert declared == set(section), (declared ^ set(section))
        assert NOT_IN_FILE.get(name, set()) <= set(node._parameters)
        for key in NOT_IN_FILE.get(name, ()):
            assert key in CONFIG.read_text(), f"config/mql.yaml's comment does not name {key}"
        for key, value in section.items():
            if key != "checkpoint":
                assert node.get_parameter(key).value == value, key
    finally:
        node.destroy_node()


def test_out_of_range_parameter_is_refused_with_its_range(ros_context):
    with pytest.raises(ConfigError, match=r"state_timeout.*\[0\.001, 10\.0\]"):
        make_node("policy", ros_context, [Parameter("state_timeout", value=50.0)])


def test_unknown_choice_is_refused_with_the_choices(ros_context):
    with pytest.raises(ConfigError, match=r"command_mode.*'position', 'velocity'"):
        make_node("policy", ros_context, [Parameter("command_mode", value="torque")])


def test_nodes_run_with_nothing_but_the_shipped_config(ros_graph):
    from std_msgs.msg import Float64MultiArray

    from mql_ros.core.paths import share_dir
    from mql_ros.nodes.common import RELIABLE_QOS

    if not (share_dir() / "checkpoints" / "arm_reach.pt").is_file():
        pytest.skip("no shipped checkpoint yet (checkpoints/arm_reach.pt)")
    probe = ros_graph.probe
    probe.subscribe(Float64MultiArray, "arm_controller/commands", RELIABLE_QOS)
    for node in ("sim_arm", "context_encoder", "policy", "adaptation"):
        ros_graph.start(node, params_files=(CONFIG,))
    probe.wait_for(lambda: len(probe.received("arm_controller/commands")) > 25, 120.0, "commands flowing")
    assert all(p.proc.poll() is None for p in ros_graph.nodes.values()), ros_graph.logs()


def test_adaptation_config_file_overrides_only_the_adapt_keys_it_names(ros_context, tiny_checkpoint, tmp_path):
    from dataclasses import replace

    from mql_ros.core.checkpoint import load_checkpoint

    config = tmp_path / "adapt.yaml"
    config.write_text("adapt:\n  archive_iters: 7\n")
    node = make_node("adaptation", ros_context, [Parameter("checkpoint", value=str(tiny_checkpoint)),
                                                 Parameter("config_file", value=str(config))])
    try:
        stored = load_checkpoint(tiny_checkpoint).config.adapt
        assert stored.new_task_iters == 5  # not the library's default (10): what the file leaves alone stays
        assert node.adapt_cfg == replace(stored, archive_iters=7)
    finally:
        node.destroy_node()


def test_an_automatic_adaptation_that_cannot_start_says_why(ros_context, tiny_checkpoint):
    import numpy as np

    from mql_ros.core.episode import Episode
    from mql_ros.core.robot import RobotSpec

    robot = RobotSpec.from_urdf()
    node = make_node("adaptation", ros_context, [Parameter("checkpoint", value=str(tiny_checkpoint)),
                                                 Parameter("min_new_transitions", value=1),
                                                 Parameter("held_out_episodes", value=3)])
    try:
        rng = np.random.default_rng(0)
        node._collect(Episode("t/0", np.zeros((6, robot.obs_dim), np.float32), rng.uniform(-1, 1, (5, robot.act_dim)),
                              rng.normal(size=5)))
        assert "automatic adaptation not started: need at least 4 complete new-task episodes" in node.diag.message
    finally:
        node.destroy_node()
