"""Serving side: what a resident server answers to joining servers."""
