"""The daemon: builds the stages from settings, runs them, answers probes and serves metrics."""
