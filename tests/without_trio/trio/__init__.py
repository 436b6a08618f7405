"""Stands in for trio in the script's child processes: trio is here only because selenium (the
browser tests) needs it, and httpcore imports it whenever it is installed (httpcore's
_synchronization.py), which cost every run of the script ~0.09 s of CPU (measured on two cores:
0.47 s to import ollama with trio, 0.38 s without). The captioner's users do not have it."""

raise ImportError("trio is left out of the script's runs in the tests")
