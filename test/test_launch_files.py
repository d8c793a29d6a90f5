"""Static checks of launch/: every executable, file, argument and parameter a launch file names exists.

`launch` is not installable on the CI machines, so the files are read as Python syntax trees rather than
run (test_launch_sim.py runs sim.launch.py for real where launch_testing is installed).
"""

import ast
import re
from pathlib import Path

import pytest

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


def test_every_launch_configuration_is_declared_as_an_argument(launch_file):
    tree = ast.parse(launch_file.read_text())
    arguments = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ARGUMENTS" for t in node.targets):
            arguments = {k.value for k in node.value.keys}
    used = set(re.findall(r'(?:LaunchConfiguration|arg)\("(\w+)"\)', launch_file.read_text()))
    assert used <= arguments, f"{launch_file.name} uses undeclared arguments {sorted(used - arguments)}"


def test_launch_files_only_import_real_launch_apis(launch_file):
    allowed = ("launch", "launch_ros", "ament_index_python", "pathlib")
    tree = ast.parse(launch_file.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.module.split(".")[0] in allowed, node.module
