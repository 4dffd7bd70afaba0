"""The front door: CLI, config, pipeline order and report."""
