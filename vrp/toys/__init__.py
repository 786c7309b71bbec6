"""The toy model zoo: tiny real-class VLMs trained on shapes-POPE (``train.py``), shipped with VRP."""
