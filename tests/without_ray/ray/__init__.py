# Put first on PYTHONPATH, this stands for a machine without Ray: importing it fails as a missing
# package does.
raise ModuleNotFoundError("No module named 'ray'", name="ray")
