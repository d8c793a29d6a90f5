"""The MQL graph on the arm simulated in Gazebo (Harmonic or newer) through ros2_control.

    ros2 launch mql_ros gazebo.launch.py [world:=empty.sdf] [checkpoint:=PATH] [archive_dir:=DIR] [replay_dir:=DIR]

Starts gz sim with the package's URDF, spawns it, bridges /clock, runs robot_state_publisher,
joint_state_broadcaster and the two position forward_command_controllers of config/controllers.yaml, then
the three MQL nodes (robot.launch.py) with use_sim_time. Gazebo publishes every joint, fingers included,
on /joint_states, so the gripper state topic is remapped there (joints are matched by name).
Task rewards and episode events come from a task node of yours (see the README's topic map).
"""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, OpaqueFunction
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

ARGUMENTS = {
    "world": ("empty.sdf", "Gazebo world file"),
    "checkpoint": ("", "meta-trained checkpoint; empty: the shipped checkpoints/arm_reach.pt"),
    "archive_dir": ("~/.mql_ros/archive", "directory the contract topics are recorded to (rosbag2 MCAP bags)"),
    "replay_dir": ("", "archive of meta-training bags (mql-ros train --archive) that adaptation reweights by "
                       "propensity; empty: new-task data and the proximal pull only"),
    "log_level": ("info", "log level of the MQL nodes"),
}


def robot_description(share: Path) -> str:
    """The URDF with the controllers file path that gz_ros2_control loads made absolute."""
    return (share / "urdf" / "mql_arm.urdf").read_text().replace("$(find mql_ros)", str(share))


def launch_setup(context: LaunchContext) -> list:
    share = Path(get_package_share_directory("mql_ros"))
    urdf = robot_description(share)
    controllers = str(share / "config" / "controllers.yaml")
    gz_launch = Path(get_package_share_directory("ros_gz_sim")) / "launch" / "gz_sim.launch.py"
    world = LaunchConfiguration("world").perform(context)

    def spawner(controller: str) -> Node:
        return Node(package="controller_manager", executable="spawner", output="screen",
                    arguments=[controller, "--param-file", controllers], parameters=[{"use_sim_time": True}])

    return [
        IncludeLaunchDescription(PythonLaunchDescriptionSource(str(gz_launch)),
                                 launch_arguments={"gz_args": f"-r {world}"}.items()),
        Node(package="robot_state_publisher", executable="robot_state_publisher", output="screen",
             parameters=[{"robot_description": ParameterValue(urdf, value_type=str), "use_sim_time": True}]),
        Node(package="ros_gz_sim", executable="create", output="screen",
             arguments=["-topic", "robot_description", "-name", "mql_arm"]),
        Node(package="ros_gz_bridge", executable="parameter_bridge", output="screen",
             arguments=["/clock@rosgraph_msgs/msg/Clock[gz.msgs.Clock"]),
        spawner("joint_state_broadcaster"),
        spawner("arm_controller"),
        spawner("gripper_controller"),
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(str(share / "launch" / "robot.launch.py")),
            launch_arguments={"checkpoint": LaunchConfiguration("checkpoint"),
                              "archive_dir": LaunchConfiguration("archive_dir"),
                              "replay_dir": LaunchConfiguration("replay_dir"),
                              "robot_description": urdf, "use_sim_time": "true",
                              "gripper_states": "/joint_states",
                              "log_level": LaunchConfiguration("log_level")}.items()),
    ]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()]
        + [OpaqueFunction(function=launch_setup)]
    )
