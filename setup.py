"""ament_python package: builds with `colcon build` in a ROS 2 workspace and with `pip install .` in a venv.

Both install the same layout under the prefix: share/mql_ros/{launch,config,urdf,checkpoints,package.xml},
the ament index marker, and the node executables in lib/mql_ros/ (so `ros2 run mql_ros <node>` and
launch_ros `Node(package="mql_ros", ...)` find them). pip does not put console scripts in lib/<package>,
hence the small wrappers in scripts/ installed there as data files.

The GRU's step loops are a small C extension (mql_ros/core/_gru_kernel.c), compiled for the machine that
builds the package. It is optional: where it does not build, the same computation runs in numpy, slower.
"""

import os
import platform
from glob import glob

from setuptools import Extension, find_packages, setup

PACKAGE = "mql_ros"
NODES = ["sim_arm", "context_encoder", "policy", "adaptation"]
# -march=native: the vector width of the CPU that builds (and, in a source install, runs) the package.
# MQL_ROS_PORTABLE=1 leaves it out, for a build that runs on other CPUs (a wheel, a container image, an
# install shared over NFS): a native build can die with SIGILL on an older CPU.
PORTABLE = os.environ.get("MQL_ROS_PORTABLE", "") not in ("", "0")
NATIVE = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") and not PORTABLE else []

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    ext_modules=[Extension(f"{PACKAGE}.core._gru_kernel", [f"{PACKAGE}/core/_gru_kernel.c"],
                           extra_compile_args=["-O3", *NATIVE], optional=True)],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
        (f"share/{PACKAGE}/urdf", glob("urdf/*.urdf")),
        (f"share/{PACKAGE}/checkpoints", glob("checkpoints/*.pt")),
        (f"lib/{PACKAGE}", [f"scripts/{node}" for node in NODES]),
    ],
    install_requires=["torch>=2.2", "numpy", "pyyaml", "gymnasium", "mujoco>=4.0", "rosbags", "mcap",
                      "mcap-ros2-support", "matplotlib", "tqdm"],
    zip_safe=False,
    maintainer="mql_ros maintainers",
    maintainer_email="maintainers@mql-ros.invalid",
    description="Meta-Q-learning (MQL) for robot arms on ROS 2",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [f"{PACKAGE.replace('_', '-')}={PACKAGE}.cli:main"]
        + [f"mql-ros-{node.replace('_', '-')}={PACKAGE}.nodes.entry:{node}" for node in NODES],
    },
)
