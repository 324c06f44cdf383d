"""Stage 1, watch: inotify on the workspace becomes hints (which paths may have changed). Knows nothing of stores."""
