"""VRP, the VLM Reliability Probe: capture once into an activation lake, analyse with SQL."""

__version__ = "0.1.0"
