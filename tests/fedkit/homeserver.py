"""Real Synapse homeservers, one subprocess each, federating over loopback TLS.

A :class:`Homeserver` owns a work directory holding everything the server
writes (config, signing key, log, SQLite database, media store). It listens on
two loopback ports:

* federation: TLS, resources ``federation``, ``keys`` and ``openid``; the server
  name is ``127.0.0.1:<that port>`` so no SRV or ``.well-known`` is involved;
* client: plain HTTP, resource ``client`` (which includes ``/_synapse/admin``)
  and the ``/health`` endpoint.

The config follows ``/work/shared/FEDERATION-NOTES.md``: IP-SAN certificates
from a :class:`~tests.fedkit.certs.KitCA` trusted through
``federation_custom_ca_list``, loopback allowed, no notary key servers, rate
limits raised, shared-secret registration, cheap bcrypt.

PostgreSQL databases are fresh per homeserver (``fedkit_<random>``) and are
cloned from a template that already holds Synapse's schema, which makes
creating one a matter of a few hundred milliseconds; SQLite databases are
copied from a similar cached template file.

Every homeserver is recorded in a module-level registry; an ``atexit`` hook and
SIGTERM/SIGINT handlers stop the processes that are still running and drop
their databases, so a crashing test run leaves nothing behind. On Linux the
child also gets ``PR_SET_PDEATHSIG`` so that it dies with the test process even
when that one is SIGKILLed (its database then stays: ``scripts-dev/fedkit gc``).

Environment:

* ``SPS_PG_HOST`` / ``SPS_PG_PORT`` / ``SPS_PG_USER`` / ``SPS_PG_PASSWORD``: the
  PostgreSQL cluster (default ``127.0.0.1:5432``, user ``postgres``, trust auth);
* ``SPS_PG_POOL_SIZE``: databases pre-created in the background (default 2);
* ``SPS_FEDKIT_TEMPLATES=0``: let Synapse build its schema from scratch.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import ctypes
import hashlib
import hmac
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import psutil
import requests
import yaml

from tests.fedkit.certs import KitCA, TLSFiles
from tests.fedkit.client import Client, MatrixError
from tests.fedkit.ports import free_port

logger = logging.getLogger(__name__)

DatabaseKind = Literal["sqlite", "postgres"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODULE_PATH = "synapse_partial_state.PartialStateModule"

#: Connection parameters of the PostgreSQL cluster the kit creates databases on.
PG_HOST = os.environ.get("SPS_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SPS_PG_PORT", "5432"))
PG_USER = os.environ.get("SPS_PG_USER", "postgres")
PG_PASSWORD = os.environ.get("SPS_PG_PASSWORD") or None

#: Set to 0 to make every homeserver build its schema from scratch instead of
#: copying a template database.
USE_TEMPLATES = os.environ.get("SPS_FEDKIT_TEMPLATES", "1") != "0"

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")

_HIGH_RATE = {"per_second": 10000, "burst_count": 100000}


class HomeserverStartError(RuntimeError):
    """Synapse exited, or did not become ready, while starting.

    The message ends with the tail of Synapse's stderr and log file, so tests can
    assert on Synapse's own error text.
    """


# ---------------------------------------------------------------------------
# Config helpers


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``: dicts recursively, all else replaced."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), dict):
            result[key] = deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _log_config(log_path: str) -> dict[str, Any]:
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


def _write_signing_key(path: str) -> None:
    import signedjson.key

    key = signedjson.key.generate_signing_key("a_" + secrets.token_hex(2))
    with open(path, "w") as f:
        signedjson.key.write_signing_keys(f, [key])


# ---------------------------------------------------------------------------
# Databases


def _pg_connect(dbname: str = "postgres") -> Any:
    import psycopg2

    conn = psycopg2.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, password=PG_PASSWORD, dbname=dbname
    )
    conn.autocommit = True
    return conn


def _synapse_schema_key() -> str:
    """A key that changes whenever the installed Synapse's schema files may change."""
    h = hashlib.sha1()
    h.update(importlib.metadata.version("matrix-synapse").encode())
    spec = importlib.util.find_spec("synapse")
    assert spec is not None and spec.submodule_search_locations
    schema_dir = os.path.join(
        list(spec.submodule_search_locations)[0], "storage", "schema"
    )
    for root, dirs, files in os.walk(schema_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, schema_dir).encode())
            h.update(str(os.path.getsize(path)).encode())
    return h.hexdigest()[:12]


# Runs in a fresh interpreter: initialise an empty database with Synapse's schema,
# exactly as Synapse does on its first start (minus module schemas, which the
# module creates itself when the server starts).
_PREPARE_SCRIPT = """
import json, sys
from synapse.storage.database import make_conn
from synapse.config.database import DatabaseConnectionConfig
from synapse.storage.engines import create_engine
from synapse.storage.prepare_database import prepare_database

db_config = json.loads(sys.argv[1])
engine = create_engine(db_config)
conn = make_conn(
    db_config=DatabaseConnectionConfig("master", db_config),
    engine=engine,
    default_txn_name="fedkit_template",
    server_name="fedkit-template",
)
prepare_database(conn, engine, config=None)
conn.commit()
conn.close()
"""


def _run_prepare(db_config: dict[str, Any]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PREPARE_SCRIPT, json.dumps(db_config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"preparing a template database failed:\n{proc.stderr[-4000:]}"
        )


def _pg_args(dbname: str) -> dict[str, Any]:
    args: dict[str, Any] = {
        "user": PG_USER,
        "host": PG_HOST,
        "port": PG_PORT,
        "dbname": dbname,
    }
    if PG_PASSWORD:
        args["password"] = PG_PASSWORD
    return args


_pg_template_lock = threading.Lock()
_pg_template_name: str | None = None


def postgres_template() -> str:
    """Name of a database holding a freshly initialised Synapse schema.

    Built once per Synapse schema (and kept between runs); the build is guarded
    by an advisory lock so parallel test processes build it only once.
    """
    global _pg_template_name
    with _pg_template_lock:
        if _pg_template_name is not None:
            return _pg_template_name
        name = f"fedkit_template_{_synapse_schema_key()}"
        conn = _pg_connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(hashtext('fedkit_template'))")
                try:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cur.fetchone() is None:
                        building = f"{name}_build_{secrets.token_hex(3)}"
                        cur.execute(
                            f'CREATE DATABASE "{building}" TEMPLATE template0'
                            " ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
                        )
                        try:
                            _run_prepare(
                                {"name": "psycopg2", "args": _pg_args(building)}
                            )
                        except BaseException:
                            cur.execute(
                                f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)'
                            )
                            raise
                        # Renaming makes the finished template appear atomically.
                        cur.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
                finally:
                    cur.execute(
                        "SELECT pg_advisory_unlock(hashtext('fedkit_template'))"
                    )
        finally:
            conn.close()
        _pg_template_name = name
        return name


def create_postgres_database(name: str | None = None) -> str:
    """Create an empty-of-data Synapse database (``C`` collation) and return its name."""
    name = name or f"fedkit_{secrets.token_hex(6)}"
    template = postgres_template() if USE_TEMPLATES else "template0"
    conn = _pg_connect()
    try:
        with conn.cursor() as cur:
            for attempt in range(20):
                try:
                    cur.execute(
                        f'CREATE DATABASE "{name}" TEMPLATE "{template}"'
                        " ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
                    )
                    break
                except Exception as e:
                    # Another session briefly connected to the template (e.g. a
                    # concurrent CREATE DATABASE): try again.
                    if (
                        "is being accessed by other users" not in str(e)
                        or attempt == 19
                    ):
                        raise
                    time.sleep(0.1)
    finally:
        conn.close()
    return name


def drop_postgres_database(name: str) -> None:
    """Drop a database, terminating any session still connected to it."""
    conn = _pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


class PostgresDatabasePool:
    """Keeps a few template copies ready, created by a background thread.

    ``CREATE DATABASE ... TEMPLATE`` of Synapse's ~1,000 relations is bound by
    fsync (about 1.2 s on the reference machine), so creating the databases
    ahead of time takes it off the start-up path of every server but the
    first. Unused databases are dropped at exit. The size comes from
    ``SPS_PG_POOL_SIZE`` (default 2; 0 disables the pool).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._ready: list[str] = []
        self._creating = 0
        self._cond = threading.Condition()
        self._closed = False

    def prime(self) -> None:
        """Start filling the pool (no-op if already full or filling)."""
        with self._cond:
            if self._closed:
                return
            missing = self.size - len(self._ready) - self._creating
            for _ in range(max(0, missing)):
                self._creating += 1
                threading.Thread(
                    target=self._create_one, name="fedkit-pg-pool", daemon=True
                ).start()

    def _create_one(self) -> None:
        name: str | None = None
        try:
            name = create_postgres_database()
        except Exception:
            logger.exception("pre-creating a database failed")
        with self._cond:
            self._creating -= 1
            if name is not None:
                if self._closed:
                    drop_postgres_database(name)
                else:
                    self._ready.append(name)
            self._cond.notify_all()

    def take(self) -> str:
        """A ready database: pooled if one is ready or being created, else new."""
        with self._cond:
            while not self._ready and self._creating and not self._closed:
                self._cond.wait()
            name = self._ready.pop() if self._ready else None
        if name is None:
            name = create_postgres_database()
        self.prime()
        return name

    def close(self) -> None:
        """Drop the unused databases; stop refilling."""
        with self._cond:
            self._closed = True
            # Let databases being created land, so they are dropped too.
            deadline = time.monotonic() + 30
            while self._creating and time.monotonic() < deadline:
                self._cond.wait(1)
            names, self._ready = self._ready, []
        for name in names:
            with contextlib.suppress(Exception):
                drop_postgres_database(name)


class _BackgroundDropper:
    """Drops databases on a worker thread (a drop after use takes ~0.3 s)."""

    def __init__(self) -> None:
        self._pending: list[str] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def drop(self, name: str) -> None:
        with self._cond:
            self._pending.append(name)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="fedkit-pg-drop", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._pending:
                    self._thread = None
                    self._cond.notify_all()
                    return
                name = self._pending[0]
            try:
                drop_postgres_database(name)
            except Exception:
                logger.exception("dropping %s failed", name)
            with self._cond:
                self._pending.remove(name)

    def wait(self) -> None:
        """Block until every queued drop is done."""
        with self._cond:
            while self._thread is not None:
                self._cond.wait()


_dropper = _BackgroundDropper()


pg_pool = PostgresDatabasePool(int(os.environ.get("SPS_PG_POOL_SIZE", "2")))


def postgres_database_exists(name: str) -> bool:
    conn = _pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
    finally:
        conn.close()


_sqlite_template_lock = threading.Lock()


def sqlite_template() -> str:
    """Path of a cached SQLite file holding a freshly initialised Synapse schema."""
    with _sqlite_template_lock:
        cache_dir = os.path.join(tempfile.gettempdir(), f"fedkit-cache-{os.getuid()}")
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"synapse-{_synapse_schema_key()}.db")
        if not os.path.exists(path):
            building = f"{path}.{os.getpid()}.{secrets.token_hex(3)}"
            try:
                _run_prepare({"name": "sqlite3", "args": {"database": building}})
                os.replace(building, path)
            finally:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(building + suffix)
        return path


# ---------------------------------------------------------------------------
# Registry of live homeservers, cleaned up at exit and on SIGTERM/SIGINT

_registry_lock = threading.RLock()
_registry: dict[int, Homeserver] = {}
_handlers_installed = False


def cleanup_all() -> None:
    """Stop every homeserver this process started and drop their databases."""
    with _registry_lock:
        servers = list(_registry.values())
    for hs in servers:
        try:
            hs.cleanup()
        except Exception:  # pragma: no cover - best effort at exit
            logger.exception("cleaning up %s failed", hs.name)
    try:
        pg_pool.close()
    except Exception:  # pragma: no cover - best effort at exit
        logger.exception("dropping pooled databases failed")
    _dropper.wait()


def wait_for_background_drops() -> None:
    """Block until databases dropped with ``background=True`` are gone."""
    _dropper.wait()


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(cleanup_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue  # e.g. SIGINT in a background job: keep ignoring it

        def handler(num: int, frame: Any, previous: Any = previous) -> None:
            cleanup_all()
            if callable(previous):
                previous(num, frame)
            else:
                signal.signal(num, signal.SIG_DFL)
                os.kill(os.getpid(), num)

        with contextlib.suppress(ValueError, OSError):
            signal.signal(signum, handler)


_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in the child between fork and exec: die with the parent (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


# ---------------------------------------------------------------------------


class Homeserver:
    """One real Synapse main process.

    Args:
        workdir: directory for everything the server writes (created).
        name: short label ("hs1"), used for certificates and messages.
        ca: the CA whose certificate every kit server trusts.
        db: ``"sqlite"`` or ``"postgres"``.
        with_module: load ``synapse_partial_state.PartialStateModule``.
        module_config: the module's config (default ``{}``).
        extra_config: deep-merged into homeserver.yaml last.
    """

    def __init__(
        self,
        workdir: str,
        name: str,
        ca: KitCA,
        db: DatabaseKind = "sqlite",
        with_module: bool = True,
        module_config: dict[str, Any] | None = None,
        extra_config: dict[str, Any] | None = None,
    ) -> None:
        if db not in ("sqlite", "postgres"):
            raise ValueError(f"db must be 'sqlite' or 'postgres', not {db!r}")
        _install_handlers()
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.name = name
        self.ca = ca
        self.db: DatabaseKind = db
        self.with_module = with_module
        self.module_config = module_config
        self.extra_config = extra_config or {}

        self.tls: TLSFiles = ca.issue(f"hs-{name}")
        self.config_path = os.path.join(self.workdir, "homeserver.yaml")
        self.log_config_path = os.path.join(self.workdir, "log.config.yaml")
        self.log_path = os.path.join(self.workdir, "homeserver.log")
        self.stderr_path = os.path.join(self.workdir, "homeserver.stderr")
        self.signing_key_path = os.path.join(self.workdir, "signing.key")
        self.sqlite_path = os.path.join(self.workdir, "homeserver.db")
        self.registration_shared_secret = secrets.token_hex(16)
        self._macaroon_secret_key = secrets.token_hex(16)
        self._form_secret = secrets.token_hex(16)
        # PostgreSQL: taken from the pool at first start.
        self.database_name: str | None = None
        if db == "postgres":
            pg_pool.prime()
        self._database_created = False
        self._ever_started = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_file: Any = None
        self._cleaned_up = False
        self._lock = threading.RLock()

        self._sampler: threading.Thread | None = None
        self._sampler_stop = threading.Event()
        self.samples: list[tuple[float, int, float]] = []  # (time, rss, cpu seconds)
        self._last_rss_peak = 0
        self._last_rss = 0
        self._last_cpu = 0.0
        self._child_cpu: dict[int, float] = {}
        self._child_peak: dict[int, int] = {}

        self._allocate_ports()
        if not os.path.exists(self.signing_key_path):
            _write_signing_key(self.signing_key_path)
        with open(self.log_config_path, "w") as f:
            yaml.safe_dump(_log_config(self.log_path), f, sort_keys=False)
        self.write_config()

        with _registry_lock:
            _registry[id(self)] = self

    # -- addresses ---------------------------------------------------------

    def _allocate_ports(self) -> None:
        self.federation_port = free_port()
        self.client_port = free_port()

    @property
    def server_name(self) -> str:
        return f"127.0.0.1:{self.federation_port}"

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def federation_url(self) -> str:
        return f"https://127.0.0.1:{self.federation_port}"

    def __repr__(self) -> str:
        return (
            f"<Homeserver {self.name} {self.server_name} db={self.db} pid={self.pid}>"
        )

    # -- config --------------------------------------------------------------

    def database_config(self) -> dict[str, Any]:
        if self.db == "sqlite":
            return {"name": "sqlite3", "args": {"database": self.sqlite_path}}
        return {
            "name": "psycopg2",
            "args": {
                **_pg_args(self.database_name or "fedkit_assigned_at_start"),
                "cp_min": 1,
                "cp_max": 10,
            },
        }

    def build_config(self) -> dict[str, Any]:
        """The full homeserver.yaml content (extra_config already merged)."""
        wd = self.workdir
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "report_stats": False,
            "pid_file": os.path.join(wd, "homeserver.pid"),
            "public_baseurl": self.client_url + "/",
            "listeners": [
                {
                    "port": self.federation_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": True,
                    "x_forwarded": False,
                    "resources": [
                        {"names": ["federation", "keys", "openid"], "compress": False}
                    ],
                },
                {
                    "port": self.client_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                },
            ],
            "tls_certificate_path": self.tls.cert_path,
            "tls_private_key_path": self.tls.key_path,
            "federation_verify_certificates": True,
            "federation_custom_ca_list": [self.ca.cert_path],
            "federation_ip_range_blacklist": [],
            "ip_range_whitelist": ["127.0.0.0/8", "::1/128"],
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "database": self.database_config(),
            "log_config": self.log_config_path,
            "media_store_path": os.path.join(wd, "media_store"),
            "signing_key_path": self.signing_key_path,
            "macaroon_secret_key": self._macaroon_secret_key,
            "form_secret": self._form_secret,
            "registration_shared_secret": self.registration_shared_secret,
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "bcrypt_rounds": 4,
            "url_preview_enabled": False,
            "enable_metrics": False,
            # Rate limits that otherwise throttle tests.
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
        if self.with_module:
            config["modules"] = [
                {"module": MODULE_PATH, "config": self.module_config or {}}
            ]
        return deep_merge(config, self.extra_config)

    def write_config(self) -> None:
        """(Re)write homeserver.yaml from :meth:`build_config`."""
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.build_config(), f, sort_keys=False)

    # -- database --------------------------------------------------------------

    def _ensure_database(self) -> None:
        if self._database_created:
            return
        if self.db == "postgres":
            self.database_name = pg_pool.take()
            self.write_config()
        elif USE_TEMPLATES and not os.path.exists(self.sqlite_path):
            shutil.copyfile(sqlite_template(), self.sqlite_path)
        self._database_created = True

    def _reset_database(self) -> None:
        if self.db == "postgres":
            if self._database_created and self.database_name:
                drop_postgres_database(self.database_name)
        else:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.sqlite_path + suffix)
        self._database_created = False

    def drop_database(self, background: bool = False) -> None:
        """Drop the PostgreSQL database (no-op for SQLite). The server must be stopped.

        ``background=True`` queues the drop on a worker thread (waited for at exit
        and by :func:`wait_for_background_drops`)."""
        if self.db == "postgres" and self._database_created and self.database_name:
            if background:
                _dropper.drop(self.database_name)
            else:
                drop_postgres_database(self.database_name)
        self._database_created = False

    # -- process ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def spawn(self) -> None:
        """Start the Synapse process without waiting for it (see :meth:`wait_ready`)."""
        with self._lock:
            if self._cleaned_up:
                raise RuntimeError(f"{self.name} was cleaned up")
            if self.is_running():
                return
            self._ensure_database()
            self._close_stderr()
            env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p
            )
            env["PYTHONUNBUFFERED"] = "1"
            self._stderr_file = open(self.stderr_path, "ab")
            self._log_offset_at_spawn = self.log_offset()
            self._stderr_offset_at_spawn = self._stderr_file.tell()
            in_main = threading.current_thread() is threading.main_thread()
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "synapse.app.homeserver",
                    "-c",
                    self.config_path,
                ],
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=self._stderr_file,
                stderr=self._stderr_file,
                start_new_session=True,
                # PDEATHSIG fires when the *thread* that forked exits, so only
                # use it when forking from the main thread.
                preexec_fn=_child_setup if in_main else None,
            )
            self._pgid = self._proc.pid
            self._last_rss_peak = 0
            self._last_rss = 0
            self._last_cpu = 0.0
            self._child_cpu.clear()
            self._child_peak.clear()

    def _check_tls(self) -> bool:
        ctx = ssl.create_default_context(cafile=self.ca.cert_path)
        try:
            with socket.create_connection(
                ("127.0.0.1", self.federation_port), timeout=2
            ) as s:
                with ctx.wrap_socket(s, server_hostname="127.0.0.1"):
                    return True
        except (OSError, ssl.SSLError):
            return False

    def _check_health(self, session: requests.Session) -> bool:
        try:
            return (
                session.get(self.client_url + "/health", timeout=2).status_code == 200
            )
        except requests.RequestException:
            return False

    def _listens_on_own_ports(self, pid: int) -> bool:
        """True if *our* process holds both listening sockets.

        Guards against another process that happens to own one of our ports
        answering the readiness probes while our Synapse is dying of EADDRINUSE."""
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            return False
        listening = {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}
        return {self.federation_port, self.client_port} <= listening

    def wait_ready(self, timeout: float = 90) -> None:
        """Wait until /health answers 200 and the federation port speaks TLS."""
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self.name} was not spawned")
        deadline = time.monotonic() + timeout
        session = requests.Session()
        session.trust_env = False
        try:
            healthy = False
            while True:
                if proc.poll() is not None:
                    raise HomeserverStartError(
                        f"{self.name} ({self.server_name}) exited with code"
                        f" {proc.returncode} while starting\n{self._failure_tail()}"
                    )
                if not healthy:
                    healthy = self._check_health(session)
                if (
                    healthy
                    and self._check_tls()
                    and self._listens_on_own_ports(proc.pid)
                ):
                    break
                if time.monotonic() > deadline:
                    self._terminate(grace=5)
                    raise HomeserverStartError(
                        f"{self.name} ({self.server_name}) not ready after {timeout}s\n"
                        f"{self._failure_tail()}"
                    )
                time.sleep(0.1)
        finally:
            session.close()
        self._ever_started = True

    def start(self, timeout: float = 90) -> Homeserver:
        """Start Synapse and wait until it serves clients and federation.

        Raises :class:`HomeserverStartError` (with the tail of stderr and the log)
        if the process exits or is not ready within ``timeout`` seconds.
        """
        for attempt in range(3):
            self.spawn()
            try:
                self.wait_ready(timeout)
                return self
            except HomeserverStartError as e:
                if (
                    self._ever_started
                    or attempt == 2
                    or "Address already in use" not in str(e)
                ):
                    raise
                self._take_new_ports()
        raise AssertionError("unreachable")

    def _take_new_ports(self) -> None:
        """After a port clash on first start: new ports, so a new server name.

        Nothing remembers the old server name yet, except the database."""
        logger.warning("%s: port clash, retrying with new ports", self.name)
        self._reset_database()
        self._allocate_ports()
        self.write_config()

    def _failure_tail(self, lines: int = 60) -> str:
        parts = []
        err = self._read_from(
            self.stderr_path, getattr(self, "_stderr_offset_at_spawn", 0)
        )
        if err.strip():
            parts.append("--- stderr ---\n" + "\n".join(err.splitlines()[-lines:]))
        log = self._read_from(self.log_path, getattr(self, "_log_offset_at_spawn", 0))
        if log.strip():
            parts.append(
                f"--- {self.log_path} ---\n" + "\n".join(log.splitlines()[-lines:])
            )
        return "\n".join(parts) or "(no output)"

    @staticmethod
    def _read_from(path: str, offset: int) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf8", "replace")
        except FileNotFoundError:
            return ""

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._pgid, signum)

    def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        # Only signal the group while its leader is unreaped: after that the
        # process group id may be reused by an unrelated process.
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM if grace > 0 else signal.SIGKILL)
            try:
                proc.wait(grace if grace > 0 else None)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %ss: SIGKILL", self.name, grace)
                self._signal_group(signal.SIGKILL)
                proc.wait()
        self._close_stderr()

    def _close_stderr(self) -> None:
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the process group, SIGKILL after ``timeout`` s. Idempotent."""
        with self._lock:
            self._sample_once()
            self._terminate(grace=timeout)

    def kill(self) -> None:
        """SIGKILL the process group (simulates a crash)."""
        with self._lock:
            self._sample_once()
            self._terminate(grace=0)

    def restart(self, timeout: float = 90) -> Homeserver:
        """Stop and start again, keeping ports, database and files."""
        self.stop()
        return self.start(timeout)

    def cleanup(self, background_drop: bool = False) -> None:
        """Stop the server and drop its PostgreSQL database. Idempotent.

        With ``background_drop`` the drop is queued (see :meth:`drop_database`)."""
        with self._lock:
            if self._cleaned_up:
                return
            self.stop_sampling()
            self.stop()
            try:
                self.drop_database(background=background_drop)
            finally:
                self._cleaned_up = True
                with _registry_lock:
                    _registry.pop(id(self), None)

    # -- resource usage ------------------------------------------------------

    def _psutil(self) -> psutil.Process | None:
        if not self.is_running():
            return None
        try:
            return psutil.Process(self.pid)
        except psutil.Error:
            return None

    def _sample_once(self) -> None:
        p = self._psutil()
        if p is None:
            return
        try:
            with p.oneshot():
                times = p.cpu_times()
                cpu = times.user + times.system
                rss = p.memory_info().rss
            peak = _vm_hwm(p.pid) or rss
            children = p.children(recursive=True)
        except psutil.Error:
            return
        # Helper processes (e.g. the module's signature-checking workers) count
        # towards the homeserver: CPU summed, peak RSS summed (an upper bound).
        for child in children:
            try:
                ctimes = child.cpu_times()
                self._child_cpu[child.pid] = ctimes.user + ctimes.system
                child_rss = child.memory_info().rss
                self._child_peak[child.pid] = max(
                    self._child_peak.get(child.pid, 0), _vm_hwm(child.pid) or child_rss
                )
                rss += child_rss
            except psutil.Error:
                continue
        # (list(): the benchmark's CPU timeline samples from its own thread.)
        cpu += sum(list(self._child_cpu.values()))
        peak += sum(list(self._child_peak.values()))
        self._last_cpu = cpu
        self._last_rss = rss
        self._last_rss_peak = max(self._last_rss_peak, peak)
        if self._sampler is not None:
            self.samples.append((time.time(), rss, cpu))

    def rss_peak_bytes(self) -> int:
        """Peak resident set size of the process (kernel VmHWM), plus its helper
        processes' peaks, bytes.

        Still available after the process stopped (last value seen)."""
        self._sample_once()
        return self._last_rss_peak

    def rss_bytes(self) -> int:
        """Resident set size now, plus its helper processes', bytes (last value
        seen once the process stopped)."""
        self._sample_once()
        return self._last_rss

    def reset_rss_peak(self) -> None:
        """Reset the kernel's peak-RSS counter (VmHWM), e.g. before a measured step."""
        if self.is_running():
            with contextlib.suppress(OSError):
                with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                    f.write("5")
            for pid in list(self._child_peak):
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/clear_refs", "w") as f:
                        f.write("5")
        self._child_peak.clear()
        self._last_rss_peak = 0

    def cpu_seconds(self) -> float:
        """User + system CPU time consumed by the process so far."""
        self._sample_once()
        return self._last_cpu

    def start_sampling(self, interval: float = 0.25) -> None:
        """Record (time, rss, cpu) into :attr:`samples` every ``interval`` s."""
        if self._sampler is not None:
            return
        self._sampler_stop.clear()

        def run() -> None:
            while not self._sampler_stop.wait(interval):
                self._sample_once()

        self._sampler = threading.Thread(
            target=run, name=f"sampler-{self.name}", daemon=True
        )
        self._sampler.start()

    def stop_sampling(self) -> None:
        if self._sampler is None:
            return
        self._sampler_stop.set()
        self._sampler.join()
        self._sampler = None

    # -- logs ------------------------------------------------------------------

    def read_log(self) -> str:
        try:
            with open(self.log_path, encoding="utf8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def log_offset(self) -> int:
        """Current size of the log, to pass as ``since`` to :meth:`wait_for_log`."""
        try:
            return os.path.getsize(self.log_path)
        except FileNotFoundError:
            return 0

    def wait_for_log(
        self, regex: str | re.Pattern[str], timeout: float = 30, since: int = 0
    ) -> re.Match[str]:
        """Wait until a line matching ``regex`` appears after byte ``since`` of the log."""
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        offset = since
        pending = b""
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")  # keep a partial last line
                for line in lines:
                    m = pattern.search(line.decode("utf8", "replace"))
                    if m:
                        return m
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: no log line matching {pattern.pattern!r} after {timeout}s"
                )
            time.sleep(0.1)

    # -- users -----------------------------------------------------------------

    def register_user(
        self, localpart: str, admin: bool = False, password: str = "pw"
    ) -> Client:
        """Register a user with the shared-secret admin API and return its client."""
        url = self.client_url + "/_synapse/admin/v1/register"
        session = requests.Session()
        session.trust_env = False
        with session:
            r = session.get(url, timeout=30)
            r.raise_for_status()
            nonce = r.json()["nonce"]
            mac = hmac.new(
                self.registration_shared_secret.encode(), digestmod=hashlib.sha1
            )
            mac.update(
                b"\x00".join(
                    p.encode()
                    for p in (
                        nonce,
                        localpart,
                        password,
                        "admin" if admin else "notadmin",
                    )
                )
            )
            r = session.post(
                url,
                json={
                    "nonce": nonce,
                    "username": localpart,
                    "password": password,
                    "admin": admin,
                    "mac": mac.hexdigest(),
                },
                timeout=30,
            )
            if r.status_code != 200:
                raise MatrixError.from_response(r)
            body = r.json()
        return Client(self.client_url, body["user_id"], body["access_token"])


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def start_all(servers: Iterable[Homeserver], timeout: float = 90) -> None:
    """Start several homeservers concurrently; raise the first failure.

    Processes are spawned from the calling thread, then waited for in parallel.
    """
    servers = list(servers)
    for hs in servers:
        hs.spawn()
    errors: list[BaseException | None] = [None] * len(servers)

    def wait(i: int) -> None:
        try:
            servers[i].wait_ready(timeout)
        except BaseException as e:
            errors[i] = e

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(len(servers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, err in enumerate(errors):
        if err is None:
            continue
        if "Address already in use" in str(err) and not servers[i]._ever_started:
            # Rare port clash: retry that one alone.
            servers[i]._take_new_ports()
            servers[i].start(timeout)
            continue
        raise err
