"""Stage 5, stores: where audit events are committed (SQLite, FoundationDB). A store knows nothing of watching."""
