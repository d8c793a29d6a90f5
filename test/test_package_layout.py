"""The package installs as a complete ament package from pip, and its core stays ROS-free."""

import ast
import os
import platform
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODES = ["sim_arm", "context_encoder", "policy", "adaptation"]
PREFIX = Path(sys.prefix)


def test_package_xml_is_format_3_ament_python():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "mql_ros"
    assert root.find("export/build_type").text == "ament_python"
    deps = {e.text for e in root.iter("exec_depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "std_srvs", "diagnostic_msgs", "launch_ros"} <= deps


def _imported_ros_interface_packages() -> set[str]:
    """Top-level *_msgs / *_srvs / *_interfaces packages that the package's code and launch files import."""
    found = set()
    for path in [*(ROOT / "mql_ros").rglob("*.py"), *(ROOT / "launch").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            found |= {n.split(".")[0] for n in names if re.search(r"_(msgs|srvs|interfaces)$", n.split(".")[0])}
    return found


def test_package_xml_declares_exactly_the_interface_packages_the_code_imports():
    """A user's rosdep installs what package.xml names: an import it misses fails on their machine only, and a
    package it names that nothing uses is an install for nothing."""
    declared = {e.text for e in ET.parse(ROOT / "package.xml").getroot().iter("exec_depend")}
    declared = {d for d in declared if re.search(r"_(msgs|srvs|interfaces)$", d)}
    imported = _imported_ros_interface_packages()
    # rclpy.lifecycle (every hardware-facing node is a lifecycle node) imports lifecycle_msgs itself; users
    # drive the transitions with its services (`ros2 lifecycle set`).
    needed = imported | {"lifecycle_msgs"}
    assert imported >= {"sensor_msgs", "std_msgs"}, imported  # the scan sees the nodes' imports
    assert needed - declared == set(), f"imported but not in package.xml: {sorted(needed - declared)}"
    assert declared - needed == set(), f"in package.xml but never imported: {sorted(declared - needed)}"


def test_core_import_does_not_import_rclpy():
    code = ("import sys, mql_ros.core.robot, mql_ros.core.episode, mql_ros.core.paths; "
            "import pkgutil, importlib, mql_ros.core as c\n"
            "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('mql_ros.core.' + m.name)\n"
            "assert 'rclpy' not in sys.modules, 'mql_ros.core imported rclpy'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the GRU runs its numpy steps")
def test_the_c_gru_kernel_is_built_where_a_compiler_is_present():
    from mql_ros.core import networks

    assert networks._gru_kernel is not None, "mql_ros/core/_gru_kernel.c was not built (run `make install`)"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("portable", ["1", ""])
def test_mql_ros_portable_builds_the_c_kernel_without_march_native(tmp_path, portable):
    env = {**os.environ, "MQL_ROS_PORTABLE": portable}
    out = subprocess.run([sys.executable, "setup.py", "-v", "build_ext", "--force", "--build-temp",
                          str(tmp_path / "tmp"), "--build-lib", str(tmp_path / "lib")],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    compile_lines = [line for line in out.stdout.splitlines() + out.stderr.splitlines() if "_gru_kernel.c" in line]
    assert compile_lines, "setup.py -v printed no compile command for the kernel"
    native = any("-march=native" in line for line in compile_lines)
    assert native == (not portable and platform.machine() in ("x86_64", "AMD64"))
    assert list((tmp_path / "lib" / "mql_ros" / "core").glob("_gru_kernel*.so")), "the kernel did not build"


@pytest.mark.skipif(not (PREFIX / "share" / "mql_ros").is_dir(), reason="package not installed in this prefix "
                    "(run `make install`)")
class TestInstalledLayout:
    def test_ament_index_marker_is_installed(self):
        assert (PREFIX / "share/ament_index/resource_index/packages/mql_ros").is_file()

    def test_share_holds_launch_config_urdf_and_package_xml(self):
        share = PREFIX / "share" / "mql_ros"
        for name in ["package.xml", "config/mql.yaml", "urdf/mql_arm.urdf", "launch/sim.launch.py"]:
            assert (share / name).is_file(), name

    @pytest.mark.parametrize("node", NODES)
    def test_node_executable_is_in_lib_package_dir(self, node):
        exe = PREFIX / "lib" / "mql_ros" / node
        assert exe.is_file() and exe.stat().st_mode & 0o111, exe

    def test_get_package_share_directory_finds_the_pip_install(self):
        from ament_index_python.packages import get_package_share_directory

        env_prefix = get_package_share_directory("mql_ros")
        assert Path(env_prefix).resolve() == (PREFIX / "share" / "mql_ros").resolve()
