"""The bulk writers: Synapse's own rows for a whole room's state, written in large
batches instead of event by event (:mod:`.gate` decides whether they may run)."""
