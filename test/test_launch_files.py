"""Checks of launch/: every executable, file, argument and parameter a launch file names exists, and what
the files hand launch_ros (parameter types, parameter files, remaps) is what the nodes need.

`launch` is not installable on the CI machines, so the files are read as Python syntax trees or run on stubs
of the launch API that record what they are given (test_launch_sim.py runs sim.launch.py for real where
launch_testing is installed; one test here uses launch_ros's own parameter rules where it is installed).
"""

import ast
import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FILES = sorted((ROOT / "launch").glob("*.launch.py"))
NODES = {"sim_arm", "context_encoder", "policy", "adaptation"}
# Parameters every rclpy node has without declaring them.
BUILTIN_PARAMETERS = {"use_sim_time"}


def mql_node_calls(tree: ast.AST) -> list[tuple[str, set[str]]]:
    """(executable, parameter names) of each mql_ros node a launch file starts.

    The files start mql_ros nodes through a local helper `node("<executable>", {<overrides>})`, or
    directly with `Node(package="mql_ros", executable=...)`.
    """
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = getattr(call.func, "id", None)
        if name == "node" and call.args and isinstance(call.args[0], ast.Constant):
            keys = set()
            for arg in call.args[1:]:
                if isinstance(arg, ast.Dict):
                    keys |= {k.value for k in arg.keys if isinstance(k, ast.Constant)}
            found.append((call.args[0].value, keys))
        if name == "Node":
            kw = {k.arg: k.value for k in call.keywords}
            if (isinstance(kw.get("package"), ast.Constant) and kw["package"].value == "mql_ros"
                    and isinstance(kw.get("executable"), ast.Constant)):
                found.append((kw["executable"].value, set()))
    return found


def declared_parameters(executable: str) -> set[str]:
    """Parameter names the node declares (directly or through mql_ros.nodes.common helpers)."""
    sources = [ROOT / "mql_ros" / "nodes" / f"{executable}.py", ROOT / "mql_ros" / "nodes" / "common.py"]
    text = "\n".join(p.read_text() for p in sources if p.exists())
    return set(re.findall(r'declare(?:_parameter)?\(\s*(?:self|node)?\s*,?\s*"([A-Za-z_][\w.]*)"', text))


@pytest.fixture(params=LAUNCH_FILES, ids=lambda p: p.name)
def launch_file(request) -> Path:
    return request.param


def test_every_expected_launch_file_exists():
    assert {p.name for p in LAUNCH_FILES} >= {"sim.launch.py", "gazebo.launch.py", "robot.launch.py"}


def test_launch_file_defines_generate_launch_description(launch_file):
    tree = ast.parse(launch_file.read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)


def test_mql_executables_named_by_launch_files_are_installed(launch_file):
    for executable, _ in mql_node_calls(ast.parse(launch_file.read_text())):
        assert executable in NODES, f"{launch_file.name} starts unknown executable {executable!r}"
        assert (ROOT / "scripts" / executable).is_file(), f"scripts/{executable} is missing"


def test_parameters_set_by_launch_files_are_declared_by_the_nodes(launch_file):
    for executable, keys in mql_node_calls(ast.parse(launch_file.read_text())):
        undeclared = keys - declared_parameters(executable) - BUILTIN_PARAMETERS
        assert not undeclared, f"{launch_file.name} sets {sorted(undeclared)} on {executable}, undeclared there"


def test_files_named_by_launch_files_exist(launch_file):
    text = launch_file.read_text()
    for folder, name in re.findall(r'"(config|urdf|launch)",\s*"([\w.]+)"', text):
        assert (ROOT / folder / name).is_file(), f"{launch_file.name} names {folder}/{name}"
    for folder, name in re.findall(r'share\s*/\s*"(config|urdf|launch)"\s*/\s*"([\w.]+)"', text):
        assert (ROOT / folder / name).is_file(), f"{launch_file.name} names {folder}/{name}"


def declared_arguments(launch_file: Path) -> set[str]:
    """The keys of the file's ARGUMENTS table, from which it declares its launch arguments."""
    for node in ast.walk(ast.parse(launch_file.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ARGUMENTS" for t in node.targets):
            return {k.value for k in node.value.keys}
    return set()


def test_every_launch_configuration_is_declared_as_an_argument(launch_file):
    arguments = declared_arguments(launch_file)
    used = set(re.findall(r'(?:LaunchConfiguration|arg|as_string)\("(\w+)"\)', launch_file.read_text()))
    assert used <= arguments, f"{launch_file.name} uses undeclared arguments {sorted(used - arguments)}"


def test_the_readme_names_exactly_the_arguments_of_each_launch_file(launch_file):
    """An argument the README gives but the file does not declare is silently ignored by ros2 launch (the
    README's `realtime_priority:=50` was, found by an audit); one it does not name is as good as missing."""
    paragraph = next(p for p in (ROOT / "README.md").read_text().split("\n\n")
                     if f"ros2 launch mql_ros {launch_file.name}" in p)
    arguments = declared_arguments(launch_file)
    given = set(re.findall(r"(\w+):=", paragraph))
    assert given <= arguments, f"the README passes {sorted(given - arguments)} to {launch_file.name}"
    unnamed = {a for a in arguments if f"`{a}`" not in paragraph and f"{a}:=" not in paragraph}
    assert not unnamed, f"the README's {launch_file.name} paragraph does not name {sorted(unnamed)}"


def test_launch_files_only_import_real_launch_apis(launch_file):
    allowed = ("launch", "launch_ros", "ament_index_python", "pathlib")
    tree = ast.parse(launch_file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module.split(".")[0] in allowed, node.module


class Recorded:
    """Stub of a launch API class: keeps what the launch file passed to it."""

    def __init__(self, *args, **kwargs):
        self.launch_args, self.launch_kwargs = args, kwargs


class LaunchDescription(Recorded):
    @property
    def entities(self) -> list:
        return self.launch_args[0]


class DeclareLaunchArgument(Recorded):
    def execute(self, context) -> None:
        context.launch_configurations.setdefault(self.launch_args[0], self.launch_kwargs["default_value"])


class OpaqueFunction(Recorded):
    def execute(self, context) -> list:
        return self.launch_kwargs["function"](context)


class LaunchConfiguration(Recorded):
    def perform(self, context) -> str:
        return context.launch_configurations[self.launch_args[0]]


def recorded(name: str) -> type:
    return type(name, (Recorded,), {})


STUB_API = {
    "launch": [recorded("LaunchContext"), LaunchDescription],
    "launch.actions": [DeclareLaunchArgument, recorded("IncludeLaunchDescription"), OpaqueFunction],
    "launch.launch_description_sources": [recorded("PythonLaunchDescriptionSource")],
    "launch.substitutions": [LaunchConfiguration, recorded("PathJoinSubstitution")],
    "launch_ros": [],
    "launch_ros.actions": [recorded("Node")],
    "launch_ros.parameter_descriptions": [recorded("ParameterValue")],
    "launch_ros.substitutions": [recorded("FindPackageShare")],
}


def run_launch_file(path: Path, context) -> list:
    """The actions of the file's launch description, its arguments declared and its OpaqueFunctions run in
    `context`, built by whichever launch API sys.modules holds (the stubs or the real one)."""
    spec = importlib.util.spec_from_file_location(path.name.replace(".", "_"), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    actions = []
    for entity in module.generate_launch_description().entities:
        if type(entity).__name__ in ("DeclareLaunchArgument", "OpaqueFunction"):
            actions += entity.execute(context) or []
        else:
            actions.append(entity)
    return actions


@pytest.fixture
def stub_launch(monkeypatch):
    """Runs a launch file on the stub API with the given launch arguments: (its Nodes, the context). Package
    shares are this source tree, which holds urdf/, config/ and launch/ as an installed share does."""
    for name, classes in STUB_API.items():
        module = types.ModuleType(name)
        module.__dict__.update({c.__name__: c for c in classes})
        monkeypatch.setitem(sys.modules, name, module)
    for name in ("ament_index_python", "ament_index_python.packages"):
        module = types.ModuleType(name)
        module.get_package_share_directory = lambda package: str(ROOT)
        monkeypatch.setitem(sys.modules, name, module)

    def run(path: Path, **arguments: str) -> tuple[list[Recorded], types.SimpleNamespace]:
        context = types.SimpleNamespace(launch_configurations=dict(arguments))
        nodes = [a for a in run_launch_file(path, context) if type(a).__name__ == "Node"]
        return nodes, context

    return run


def parameter_dicts(node: Recorded) -> list[dict]:
    return [p for p in node.launch_kwargs.get("parameters", []) if isinstance(p, dict)]


def config_defaults(executable: str) -> dict:
    """The node's parameters in config/mql.yaml, with their defaults (and so their types)."""
    sections = yaml.safe_load((ROOT / "config" / "mql.yaml").read_text())
    return sections.get(f"/**/{executable}", {}).get("ros__parameters", {})


def test_robot_description_reaches_every_node_as_a_string_parameter_value(launch_file, stub_launch):
    """launch_ros reads a plain substitution parameter as YAML, and a URDF is not YAML
    (test_the_shipped_urdf_is_not_yaml), so gazebo.launch.py could not start the MQL nodes and
    `robot_description:="$(cat my_arm.urdf)"` failed the same way (found by an audit)."""
    nodes, _ = stub_launch(launch_file)
    given = [p["robot_description"] for n in nodes for p in parameter_dicts(n) if "robot_description" in p]
    for value in given:
        assert type(value).__name__ == "ParameterValue", f"{launch_file.name}: robot_description is {value!r}"
        assert value.launch_kwargs.get("value_type") is str, launch_file.name
    assert given or launch_file.name == "sim.launch.py"


def test_launch_arguments_are_read_as_yaml_only_for_bool_and_number_parameters(launch_file, stub_launch):
    """A plain substitution is typed by YAML: right for `use_sim_time:=true` or `task_index:=2`, wrong for a
    string parameter (a checkpoint path `no` becomes false, `1.5` a double, a URDF an error), so those are
    ParameterValue(..., value_type=str)."""
    nodes, _ = stub_launch(launch_file)
    for node in nodes:
        defaults = {"use_sim_time": False} | config_defaults(node.launch_kwargs["executable"])
        for params in parameter_dicts(node):
            for name, value in params.items():
                if isinstance(value, LaunchConfiguration):
                    assert isinstance(defaults.get(name), bool | int | float), (
                        f"{launch_file.name} passes {name} of {node.launch_kwargs['executable']} as YAML")


def test_the_shipped_urdf_is_not_yaml():
    """Why robot_description must not go through launch_ros's YAML reading (its evaluate_parameter_dict runs
    yaml.safe_load on a plain substitution's text; test_launch_ros_gives_the_robot_launch_nodes_the_urdf_as_it_is
    runs that code where launch_ros is installed): the URDF's comment fails to parse at line 3."""
    with pytest.raises(yaml.YAMLError, match="line 3"):
        yaml.safe_load((ROOT / "urdf" / "mql_arm.urdf").read_text())


def test_launch_ros_gives_the_robot_launch_nodes_the_urdf_as_it_is(monkeypatch):
    """launch_ros's own parameter rules, where it is installed: every node of robot.launch.py gets the URDF
    text and string arguments that look like YAML unchanged, where a plain substitution is refused."""
    pytest.importorskip("launch_ros")
    import launch_ros.actions
    from launch import LaunchContext
    from launch.substitutions import LaunchConfiguration as RealLaunchConfiguration
    from launch_ros.utilities import evaluate_parameters, normalize_parameters

    given = []

    class RecordingNode(launch_ros.actions.Node):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            given.append(kwargs["parameters"])

    monkeypatch.setattr(launch_ros.actions, "Node", RecordingNode)
    urdf = (ROOT / "urdf" / "mql_arm.urdf").read_text()
    context = LaunchContext()
    context.launch_configurations.update(robot_description=urdf, checkpoint="no", archive_dir="1.5")
    run_launch_file(ROOT / "launch" / "robot.launch.py", context)
    assert len(given) == 3
    for parameters in given:
        evaluated = evaluate_parameters(context, normalize_parameters([p for p in parameters if isinstance(p, dict)]))
        values = {k: v for d in evaluated for k, v in d.items()}
        assert values["robot_description"] == urdf and values["checkpoint"] == "no"
    with pytest.raises((TypeError, yaml.YAMLError)):
        evaluate_parameters(context, normalize_parameters([{"robot_description": RealLaunchConfiguration(
            "robot_description")}]))


def test_robot_launch_reads_params_file_after_the_package_config_and_before_the_launch_arguments(stub_launch):
    """arm_joints / gripper_joints of a physical arm come from a parameter file; an empty params_file adds
    none (rcl would fail to open it)."""
    robot = ROOT / "launch" / "robot.launch.py"
    for nodes, expected in [(stub_launch(robot)[0], []),
                            (stub_launch(robot, params_file="/robots/my_arm.yaml")[0], ["/robots/my_arm.yaml"])]:
        assert len(nodes) == 3
        for node in nodes:
            config, *files, overrides = node.launch_kwargs["parameters"]
            assert config.launch_args[0][1:] == ["config", "mql.yaml"]
            assert files == expected and isinstance(overrides, dict)


def test_robot_launch_passes_realtime_priority_to_the_policy(stub_launch):
    nodes, context = stub_launch(ROOT / "launch" / "robot.launch.py", realtime_priority="50")
    (policy,) = [n for n in nodes if n.launch_kwargs["executable"] == "policy"]
    value = {k: v for p in parameter_dicts(policy) for k, v in p.items()}["realtime_priority"]
    assert yaml.safe_load(value.perform(context)) == 50  # an integer, as the policy declares it


@pytest.mark.parametrize(("arguments", "expected"), [
    ({}, ["/joint_states", "/gripper/joint_states", "/arm_controller/commands", "/gripper_controller/commands"]),
    ({"namespace": "arm1"}, ["/arm1/joint_states", "/arm1/gripper/joint_states", "/arm1/arm_controller/commands",
                             "/arm1/gripper_controller/commands"]),
    ({"namespace": "arm1", "joint_states": "/joint_states", "gripper_commands": "/hand/commands"},
     ["/joint_states", "/arm1/gripper/joint_states", "/arm1/arm_controller/commands", "/hand/commands"]),
], ids=["no namespace", "namespace", "namespace with absolute topics"])
def test_robot_launch_topics_resolve_inside_its_namespace(arguments, expected, stub_launch, ros_context):
    """The remaps as rcl applies them (rclpy's resolve_topic_name): the graph moves into `namespace` with its
    topics, an absolute topic argument stays as given. Rules on absolute names (`/joint_states:=...`) match
    nothing once the nodes have a namespace, so the topic arguments were ignored there (found by an audit)."""
    import rclpy

    nodes, context = stub_launch(ROOT / "launch" / "robot.launch.py", **arguments)
    assert len(nodes) == 3
    for launched in nodes:
        kwargs = launched.launch_kwargs
        rules = [f"{topic}:={target.perform(context)}" for topic, target in kwargs["remappings"]]
        node = rclpy.create_node(kwargs["name"], namespace=kwargs["namespace"].perform(context), context=ros_context,
                                 cli_args=["--ros-args"] + [a for r in rules for a in ("-r", r)],
                                 start_parameter_services=False, enable_rosout=False)
        try:
            assert [node.resolve_topic_name(t) for t in ("joint_states", "gripper/joint_states",
                                                          "arm_controller/commands",
                                                          "gripper_controller/commands")] == expected
        finally:
            node.destroy_node()
