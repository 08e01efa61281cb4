"""Errors reported to control API callers."""

from __future__ import annotations


class ControlError(Exception):
    """An error reported to the control API caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
