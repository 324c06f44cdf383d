"""Provisioning of a user's workspace on Kubernetes. Beside the daemon, never in its data path."""
