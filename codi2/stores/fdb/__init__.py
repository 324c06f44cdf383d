"""The FoundationDB store: `client` (bindings, API version, TLS, cluster file), `codec` (the key layout and
values, pure), `sink` (`FdbSink`: the transactions)."""
