"""Simulated hardware: the MuJoCo arm loaded from urdf/, and the built-in task families."""
