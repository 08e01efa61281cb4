"""How Synapse says what went wrong: its private exception classes, asked about
in one place."""

from __future__ import annotations


def is_pull_backoff(error: BaseException) -> int | None:
    """``retry_after_ms`` if ``error`` is Synapse's pull-attempt back-off."""
    from synapse.api.errors import FederationPullAttemptBackoffError

    if isinstance(error, FederationPullAttemptBackoffError):
        return int(error.retry_after_ms)
    return None


def is_federation_failure(error: BaseException) -> bool:
    """Whether ``error`` is how native says "this server could not give us state"."""
    from synapse.api.errors import FederationError

    return isinstance(error, FederationError)


def looks_remote(error: BaseException) -> bool:
    """Errors a remote server causes (as opposed to a bug here): Synapse's HTTP,
    response-validation, send and retry-limiter errors, and bad values."""
    from synapse.api.errors import (
        HttpResponseException,
        RequestSendFailed,
        SynapseError,
    )
    from synapse.federation.federation_client import InvalidResponseError
    from synapse.util.retryutils import NotRetryingDestination

    return isinstance(
        error,
        (
            HttpResponseException,
            InvalidResponseError,
            RequestSendFailed,
            SynapseError,
            NotRetryingDestination,
            ValueError,
        ),
    )


def is_local_fault(error: BaseException) -> bool:
    """Errors of this server, whoever we were talking to: the database (its
    driver's errors, raised through Synapse's storage as they are) and a broken
    signature-worker pool. Looked for along the ``__cause__`` chain, so a
    wrapped database error still counts."""
    import sqlite3
    from concurrent.futures.process import BrokenProcessPool

    kinds: tuple[type[BaseException], ...] = (sqlite3.Error, BrokenProcessPool)
    try:
        import psycopg2
    except ImportError:  # pragma: no cover - SQLite-only installs
        pass
    else:
        kinds += (psycopg2.Error,)
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
