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
