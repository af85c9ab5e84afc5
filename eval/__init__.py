"""Scripts that load a workdir's checkpoint and report metrics (python -m eval.<name>)."""
