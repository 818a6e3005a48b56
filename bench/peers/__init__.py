"""Peer servers for the benchmark: the same scikit-learn wine model (one row of 13 floats in,
class probabilities out), each served by another framework from a virtual environment of its own
(``.venv-peers/<name>``, made by ``make peers`` from ``requirements-<name>.txt``).

Each server script reads the model's skops file from ``PEER_MODEL_FILE`` and its port from
``PEER_PORT``; ``bench/peer_servers.py`` says how to start, probe and load each one.
"""
