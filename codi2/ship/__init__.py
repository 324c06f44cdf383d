"""Stage 4, ship: committed batches from the outbox to the store, and the store's health."""
