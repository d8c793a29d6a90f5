"""Only the three MQL nodes, for a physical arm (or any ros2_control robot) that already runs.

    ros2 launch mql_ros robot.launch.py robot_description:="$(cat my_arm.urdf)" params_file:=my_arm.yaml \
        joint_states:=/joint_states arm_commands:=/arm_controller/commands \
        gripper_states:=/gripper/joint_states gripper_commands:=/gripper_controller/commands \
        [realtime_priority:=50] [namespace:=NS]

The robot must publish sensor_msgs/JointState for the arm and the gripper and run two position
forward_command_controllers; the topic arguments remap the contract topics onto its names. The remap rules
name the nodes' own relative topics, so they match inside `namespace` too; relative targets (the defaults)
move into the namespace with the nodes, absolute ones stay as given. Joint limits come from
robot_description (the policy clamps every command to them).
"""

from launch import LaunchContext, LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

ARGUMENTS = {
    "checkpoint": ("", "meta-trained checkpoint; empty: the shipped checkpoints/arm_reach.pt"),
    "archive_dir": ("~/.mql_ros/archive", "directory the contract topics are recorded to (rosbag2 MCAP bags)"),
    "replay_dir": ("", "archive of meta-training bags (mql-ros train --archive) that adaptation reweights by "
                       "propensity; empty: new-task data and the proximal pull only"),
    "robot_description": ("", "URDF XML of the arm; empty: the package's urdf/mql_arm.urdf"),
    "params_file": ("", "parameter file for every MQL node (e.g. arm_joints, gripper_joints in a /** section), "
                        "read after config/mql.yaml; the launch arguments override it"),
    "joint_states": ("joint_states", "the arm's JointState topic"),
    "gripper_states": ("gripper/joint_states", "the gripper's JointState topic"),
    "arm_commands": ("arm_controller/commands", "the arm position controller's command topic"),
    "gripper_commands": ("gripper_controller/commands", "the gripper position controller's command topic"),
    "realtime_priority": ("0", "SCHED_FIFO priority of the policy node's threads (0: normal scheduling)"),
    "use_sim_time": ("false", "use /clock (true under Gazebo)"),
    "namespace": ("", "namespace of every node"),
    "log_level": ("info", "log level of every node"),
}


def as_string(name: str) -> ParameterValue:
    """Launch argument `name` as a string parameter: launch_ros reads a plain substitution as YAML, which a
    URDF is not (the launch fails) and which turns a path like `no` or `1.5` into another type."""
    return ParameterValue(LaunchConfiguration(name), value_type=str)


def launch_setup(context: LaunchContext) -> list:
    """The nodes, built once the arguments are known: an empty params_file must add no file at all."""
    arg = LaunchConfiguration
    params_file = arg("params_file").perform(context)
    params = [PathJoinSubstitution([FindPackageShare("mql_ros"), "config", "mql.yaml"])]
    params += [params_file] if params_file else []
    remaps = [("joint_states", arg("joint_states")), ("gripper/joint_states", arg("gripper_states")),
              ("arm_controller/commands", arg("arm_commands")),
              ("gripper_controller/commands", arg("gripper_commands"))]
    common = {"checkpoint": as_string("checkpoint"), "robot_description": as_string("robot_description"),
              "use_sim_time": arg("use_sim_time")}

    def node(executable: str, extra: dict) -> Node:
        return Node(package="mql_ros", executable=executable, name=executable, namespace=arg("namespace"),
                    parameters=params + [{**common, **extra}], remappings=remaps,
                    arguments=["--ros-args", "--log-level", arg("log_level")], output="screen")

    return [node("context_encoder", {}), node("policy", {"realtime_priority": arg("realtime_priority")}),
            node("adaptation", {"archive_dir": as_string("archive_dir"), "replay_dir": as_string("replay_dir")})]


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription(
        [DeclareLaunchArgument(name, default_value=default, description=description)
         for name, (default, description) in ARGUMENTS.items()]
        + [OpaqueFunction(function=launch_setup)]
    )
