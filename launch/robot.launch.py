"""Only the three MQL nodes, for a physical arm (or any ros2_control robot) that already runs.

    ros2 launch mql_ros robot.launch.py robot_description:="$(cat my_arm.urdf)" \
        joint_states:=/joint_states arm_commands:=/arm_controller/commands \
        gripper_states:=/gripper/joint_states gripper_commands:=/gripper_controller/commands

The robot must publish sensor_msgs/JointState for the arm and the gripper and run two position
forward_command_controllers; the topic arguments remap the contract topics onto its names. Joint limits
come from robot_description (the policy clamps every command to them).
"""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = {
    "checkpoint": ("", "meta-trained checkpoint; empty: the shipped checkpoints/arm_reach.pt"),
    "archive_dir": ("~/.mql_ros/archive", "replay archive directory (rosbag2 MCAP bags)"),
    "robot_description": ("", "URDF XML of the arm; empty: the package's urdf/mql_arm.urdf"),
    "joint_states": ("/joint_states", "the arm's JointState topic"),
    "gripper_states": ("/gripper/joint_states", "the gripper's JointState topic"),
    "arm_commands": ("/arm_controller/commands", "the arm position controller's command topic"),
    "gripper_commands": ("/gripper_controller/commands", "the gripper position controller's command topic"),
    "use_sim_time": ("false", "use /clock (true under Gazebo)"),
    "namespace": ("", "namespace of every node"),
    "log_level": ("info", "log level of every node"),
}


def generate_launch_description() -> LaunchDescription:
    arg = LaunchConfiguration
    params = [PathJoinSubstitution([FindPackageShare("mql_ros"), "config", "mql.yaml"])]
    remaps = [("/joint_states", arg("joint_states")), ("/gripper/joint_states", arg("gripper_states")),
              ("/arm_controller/commands", arg("arm_commands")),
              ("/gripper_controller/commands", arg("gripper_commands"))]
    common = {"checkpoint": arg("checkpoint"), "robot_description": arg("robot_description"),
              "use_sim_time": arg("use_sim_time")}

    def node(executable: str, extra: dict) -> Node:
        return Node(package="mql_ros", executable=executable, name=executable, namespace=arg("namespace"),
                    parameters=params + [{**common, **extra}], remappings=remaps,
                    arguments=["--ros-args", "--log-level", arg("log_level")], output="screen")

    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=text)
         for name, (default, text) in ARGUMENTS.items()]
        + [node("context_encoder", {}), node("policy", {}),
           node("adaptation", {"archive_dir": arg("archive_dir")})]
    )
