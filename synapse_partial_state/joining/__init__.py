"""Joining side: the durable, never-stuck resync engine for partial-state rooms."""
