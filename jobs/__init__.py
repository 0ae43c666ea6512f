"""Thin Ray job entrypoints: parse a config, build, run. Usable with `ray job submit -- python -m jobs.<name>`."""
