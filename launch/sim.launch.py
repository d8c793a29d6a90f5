"""The MQL graph on the MuJoCo simulated arm: sim_arm + context_encoder + policy + adaptation.

    ros2 launch mql_ros sim.launch.py [checkpoint:=PATH] [archive_dir:=DIR] [replay_dir:=DIR] [family:=arm_reach]
        [task_split:=test] [task_index:=0] [namespace:=NS] [log_level:=info]

Every node reads config/mql.yaml; the launch arguments override its task and file parameters.
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = {
    "checkpoint": ("", "meta-trained checkpoint; empty: the shipped checkpoints/arm_reach.pt"),
    "archive_dir": ("~/.mql_ros/archive", "directory the contract topics are recorded to (rosbag2 MCAP bags)"),
    "replay_dir": ("", "archive of meta-training bags (mql-ros train --archive) that adaptation reweights by "
                       "propensity; empty: new-task data and the proximal pull only"),
    "family": ("arm_reach", "task family of the simulated arm"),
    "task_split": ("test", "split the simulated task is taken from: train, test or ood"),
    "task_index": ("0", "index of the simulated task in its split"),
    "namespace": ("", "namespace of every node"),
    "log_level": ("info", "log level of every node"),
}


def as_string(name: str) -> ParameterValue:
    """Launch argument `name` as a string parameter: launch_ros reads a plain substitution as YAML, which
    turns a path or name like `no`, `1.5` or `null` into another type (or fails the launch)."""
    return ParameterValue(LaunchConfiguration(name), value_type=str)


def generate_launch_description() -> LaunchDescription:
    arg = LaunchConfiguration
    params_file = PathJoinSubstitution([FindPackageShare("mql_ros"), "config", "mql.yaml"])
    ros_args = ["--ros-args", "--log-level", arg("log_level")]

    def node(executable: str, overrides: dict) -> Node:
        return Node(package="mql_ros", executable=executable, name=executable, namespace=arg("namespace"),
                    parameters=[params_file, overrides], arguments=ros_args, output="screen")

    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()]
        + [
            node("sim_arm", {"family": as_string("family"), "task_split": as_string("task_split"),
                             "task_index": arg("task_index")}),
            node("context_encoder", {"checkpoint": as_string("checkpoint")}),
            node("policy", {"checkpoint": as_string("checkpoint")}),
            node("adaptation", {"checkpoint": as_string("checkpoint"), "archive_dir": as_string("archive_dir"),
                                "replay_dir": as_string("replay_dir")}),
        ]
    )
