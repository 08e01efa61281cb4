"""What a kit homeserver's files say: homeserver.yaml, log config, signing key.

The config follows ``/work/shared/FEDERATION-NOTES.md``: two loopback listeners
(federation over TLS, client over plain HTTP), IP-SAN certificates from a
:class:`~tests.fedkit.certs.KitCA` trusted through ``federation_custom_ca_list``,
loopback allowed, no notary key servers (:func:`trusted_key_servers` for
a fake peer's notary), rate limits raised, shared-secret
registration, cheap bcrypt.

These are plain functions of what they need; :class:`~tests.fedkit.homeserver.Homeserver`
calls them with its ports, paths and secrets.
"""

from __future__ import annotations

import copy
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from tests.fedkit.certs import TLSFiles
from tests.fedkit.postgres import pg_args

DatabaseKind = Literal["sqlite", "postgres"]

MODULE_PATH = "synapse_partial_state.PartialStateModule"

_HIGH_RATE = {"per_second": 10000, "burst_count": 100000}


@dataclass
class Secrets:
    """A homeserver's secrets in homeserver.yaml (:meth:`generate` makes random ones)."""

    registration_shared_secret: str
    macaroon_secret_key: str
    form_secret: str

    @classmethod
    def generate(cls) -> Secrets:
        return cls(
            registration_shared_secret=secrets.token_hex(16),
            macaroon_secret_key=secrets.token_hex(16),
            form_secret=secrets.token_hex(16),
        )


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``: dicts recursively, all else replaced."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def log_config(log_path: str) -> dict[str, Any]:
    """Synapse's logging config: everything at INFO (the module at DEBUG) to ``log_path``."""
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                " - %(request)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": log_path,
                "encoding": "utf8",
            },
            # Buffered like Synapse's sample config, but flushed five times a
            # second so that tests waiting for log lines see them quickly.
            "buffer": {
                "class": "synapse.logging.handlers.PeriodicallyFlushingMemoryHandler",
                "target": "file",
                "capacity": 200,
                "flushLevel": 30,
                "period": 0.2,
            },
        },
        "loggers": {
            "synapse.storage.SQL": {"level": "INFO"},
            "synapse_partial_state": {"level": "DEBUG"},
        },
        "root": {"level": "INFO", "handlers": ["buffer"]},
        "disable_existing_loggers": False,
    }


def write_signing_key(path: str) -> None:
    """Write a new ed25519 signing key to ``path``."""
    import signedjson.key

    key = signedjson.key.generate_signing_key("a_" + secrets.token_hex(2))
    with open(path, "w") as f:
        signedjson.key.write_signing_keys(f, [key])


def database_config(
    db: DatabaseKind, sqlite_path: str, database_name: str | None
) -> dict[str, Any]:
    """The ``database`` section: the SQLite file, or the PostgreSQL database."""
    if db == "sqlite":
        return {"name": "sqlite3", "args": {"database": sqlite_path}}
    return {
        "name": "psycopg2",
        "args": {
            **pg_args(database_name or "fedkit_assigned_at_start"),
            "cp_min": 1,
            "cp_max": 10,
        },
    }


def listeners_config(federation_port: int, client_port: int) -> list[dict[str, Any]]:
    """Federation (TLS: federation, keys, openid) and client (plain HTTP) listeners."""
    return [
        {
            "port": federation_port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": True,
            "x_forwarded": False,
            "resources": [
                {"names": ["federation", "keys", "openid"], "compress": False}
            ],
        },
        {
            "port": client_port,
            "bind_addresses": ["127.0.0.1"],
            "type": "http",
            "tls": False,
            "x_forwarded": False,
            "resources": [{"names": ["client"], "compress": False}],
        },
    ]


def modules_config(
    with_module: bool, module_config: dict[str, Any] | None
) -> list[dict[str, Any]] | None:
    """The ``modules`` section loading synapse_partial_state, or None without it."""
    if not with_module:
        return None
    return [{"module": MODULE_PATH, "config": module_config or {}}]


def _rate_limits() -> dict[str, Any]:
    """Rate limits that otherwise throttle tests."""
    return {
        "rc_message": _HIGH_RATE,
        "rc_registration": _HIGH_RATE,
        "rc_login": {
            "address": _HIGH_RATE,
            "account": _HIGH_RATE,
            "failed_attempts": _HIGH_RATE,
        },
        "rc_joins": {"local": _HIGH_RATE, "remote": _HIGH_RATE},
        "rc_joins_per_room": _HIGH_RATE,
        "rc_invites": {
            "per_room": _HIGH_RATE,
            "per_user": _HIGH_RATE,
            "per_issuer": _HIGH_RATE,
        },
        "rc_3pid_validation": _HIGH_RATE,
        "rc_admin_redaction": _HIGH_RATE,
        "rc_key_requests": _HIGH_RATE,
        "rc_presence": {"per_user": _HIGH_RATE},
        "rc_room_creation": _HIGH_RATE,
        "rc_delayed_event_mgmt": _HIGH_RATE,
        "rc_reports": _HIGH_RATE,
        "rc_user_directory": _HIGH_RATE,
        "rc_profile": _HIGH_RATE,
        "rc_media_create": _HIGH_RATE,
        "rc_federation": {
            "window_size": 1000,
            "sleep_limit": 100000,
            "sleep_delay": 1,
            "reject_limit": 1000000,
            "concurrent": 1000,
        },
        "federation_rr_transactions_per_room_per_second": 10000,
    }


def trusted_key_servers(*notaries: Mapping[str, Any]) -> dict[str, Any]:
    """The ``extra_config`` that makes a homeserver ask these notaries for other
    servers' keys, each ``{"server_name", "verify_keys": {key id: base64}}`` (as
    :meth:`~tests.fedkit.fakepeer.control_client.FakePeer.notary` gives), instead
    of the kit's default of none."""
    return {
        "trusted_key_servers": [
            {"server_name": n["server_name"], "verify_keys": dict(n["verify_keys"])}
            for n in notaries
        ]
    }


def homeserver_config(
    *,
    workdir: str,
    server_name: str,
    public_baseurl: str,
    listeners: list[dict[str, Any]],
    tls: TLSFiles,
    ca_cert_path: str,
    database: dict[str, Any],
    log_config_path: str,
    signing_key_path: str,
    server_secrets: Secrets,
    modules: list[dict[str, Any]] | None,
    extra_config: Mapping[str, Any],
) -> dict[str, Any]:
    """The full homeserver.yaml content, ``extra_config`` deep-merged last."""
    config: dict[str, Any] = {
        "server_name": server_name,
        "report_stats": False,
        "pid_file": os.path.join(workdir, "homeserver.pid"),
        "public_baseurl": public_baseurl,
        "listeners": listeners,
        "tls_certificate_path": tls.cert_path,
        "tls_private_key_path": tls.key_path,
        "federation_verify_certificates": True,
        "federation_custom_ca_list": [ca_cert_path],
        "federation_ip_range_blacklist": [],
        "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
        "trusted_key_servers": [],
        "suppress_key_server_warning": True,
        "database": database,
        "log_config": log_config_path,
        "media_store_path": os.path.join(workdir, "media_store"),
        "signing_key_path": signing_key_path,
        "macaroon_secret_key": server_secrets.macaroon_secret_key,
        "form_secret": server_secrets.form_secret,
        "registration_shared_secret": server_secrets.registration_shared_secret,
        "enable_registration": True,
        "enable_registration_without_verification": True,
        "bcrypt_rounds": 4,
        "url_preview_enabled": False,
        "enable_metrics": False,
        **_rate_limits(),
    }
    if modules is not None:
        config["modules"] = modules
    return deep_merge(config, extra_config)
