"""Stage 2, pipeline: hints gathered in a batch window and reconciled against the index into events."""
