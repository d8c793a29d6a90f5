"""Node executables start here, with SIGINT/SIGTERM already handled while the node's module imports.

Importing a node (rclpy, numpy, torch) takes seconds, and before main_for installs its handlers a signal
killed the process with the signal's status (-2 / -15): a launch shut down in that time reported a node that
died, and launch_testing's exit-code checks failed. Here a signal during the imports ends the node with 0.
"""

from __future__ import annotations

import importlib
import signal
import sys


def run(node: str, args: list[str] | None = None) -> int:
    """Import mql_ros.nodes.<node> and run its main(args), or exit 0 if SIGINT/SIGTERM arrived meanwhile."""
    stops: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stops.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        main = importlib.import_module(f"mql_ros.nodes.{node}").main
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stops:
        print(f"{node}: {signal.Signals(stops[0]).name} before the node started; not starting it", file=sys.stderr)
        return 0
    return main(args)


def sim_arm() -> int:
    return run("sim_arm")


def context_encoder() -> int:
    return run("context_encoder")


def policy() -> int:
    return run("policy")


def adaptation() -> int:
    return run("adaptation")
