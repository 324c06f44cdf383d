"""The trail model shared by the daemon and the CLI: events, the hash chain, replay (the fold) and verify."""
