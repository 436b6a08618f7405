"""Stands in for trio in the tests' processes and the script's runs they start (pytest.ini's
pythonpath, conftest's child_environment): trio is here only because selenium needs it (for its
CDP connection, which the browser tests do not use), and httpcore imports it whenever it is
installed (httpcore's _synchronization.py), which cost every run of the script ~0.09 s of CPU
(measured on two cores: 0.47 s to import ollama with trio, 0.38 s without), and each xdist
worker 0.11 s. The captioner's users do not have it."""

raise ImportError("trio is left out of the tests and of the script's runs they start")
