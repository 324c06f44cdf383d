"""Stage 3, journal: journal.db, the file-state index and the outbox, written only by the journal thread."""
