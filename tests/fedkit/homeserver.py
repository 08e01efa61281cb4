"""Real Synapse homeservers, one subprocess each, federating over loopback TLS.

A :class:`Homeserver` owns a work directory holding everything the server
writes (config, signing key, log, SQLite database, media store). It listens on
two loopback ports:

* federation: TLS, resources ``federation``, ``keys`` and ``openid``; the server
  name is ``127.0.0.1:<that port>`` so no SRV or ``.well-known`` is involved;
* client: plain HTTP, resource ``client`` (which includes ``/_synapse/admin``)
  and the ``/health`` endpoint.

This module is the lifecycle (start, stop, kill, restart, clean-up); the rest
lives next to it:

* :mod:`tests.fedkit.process`: spawning Synapse, readiness probes, signals, output;
* :mod:`tests.fedkit.hsconfig`: homeserver.yaml, the log config, the signing key;
* :mod:`tests.fedkit.postgres`: fresh PostgreSQL databases (template, pool, drops);
* :mod:`tests.fedkit.schema`: the cached schema templates (and the SQLite one);
* :mod:`tests.fedkit.sampling`: RSS and CPU sampling;
* :mod:`tests.fedkit.users`: user registration;
* :mod:`tests.fedkit.cleanup`: the registry of live homeservers, cleaned up at
  exit and on SIGTERM/SIGINT (:func:`~tests.fedkit.cleanup.cleanup_all`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterable
from typing import Any

import requests
import yaml

from tests.fedkit import hsconfig, postgres, process, users
from tests.fedkit.certs import KitCA, TLSFiles
from tests.fedkit.cleanup import install_handlers, register_server, unregister_server
from tests.fedkit.hsconfig import DatabaseKind
from tests.fedkit.matrix_client import Client
from tests.fedkit.ports import free_port
from tests.fedkit.sampling import ResourceSampler
from tests.fedkit.schema import USE_TEMPLATES, sqlite_template

logger = logging.getLogger(__name__)


class HomeserverStartError(RuntimeError):
    """Synapse exited, or did not become ready, while starting.

    The message ends with the tail of Synapse's stderr and log file, so tests can
    assert on Synapse's own error text.
    """


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
        env: environment variables set for the Synapse process, on top of the
            kit's (e.g. ``SPS_TESTED_SYNAPSE_RANGE``).
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
        env: dict[str, str] | None = None,
    ) -> None:
        if db not in ("sqlite", "postgres"):
            raise ValueError(f"db must be 'sqlite' or 'postgres', not {db!r}")
        install_handlers()
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.name = name
        self.ca = ca
        self.db: DatabaseKind = db
        self.with_module = with_module
        self.module_config = module_config
        self.extra_config = extra_config or {}
        self.env = dict(env or {})

        self.tls: TLSFiles = ca.issue(f"hs-{name}")
        self.config_path = os.path.join(self.workdir, "homeserver.yaml")
        self.log_config_path = os.path.join(self.workdir, "log.config.yaml")
        self.log_path = os.path.join(self.workdir, "homeserver.log")
        self.stderr_path = os.path.join(self.workdir, "homeserver.stderr")
        self.signing_key_path = os.path.join(self.workdir, "signing.key")
        self.sqlite_path = os.path.join(self.workdir, "homeserver.db")
        self.secrets = hsconfig.Secrets.generate()
        # PostgreSQL: taken from the pool at first start.
        self.database_name: str | None = None
        if db == "postgres":
            postgres.pg_pool.prime()
        self._database_created = False
        self._ever_started = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_file: Any = None
        self._cleaned_up = False
        self._lock = threading.RLock()
        self.resources = ResourceSampler(name, self._running_pid)

        self._allocate_ports()
        self._write_files()

        register_server(self)

    def _write_files(self) -> None:
        """The signing key (unless there is one), the log config and homeserver.yaml."""
        if not os.path.exists(self.signing_key_path):
            hsconfig.write_signing_key(self.signing_key_path)
        with open(self.log_config_path, "w") as f:
            yaml.safe_dump(hsconfig.log_config(self.log_path), f, sort_keys=False)
        self.write_config()

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

    @property
    def registration_shared_secret(self) -> str:
        return self.secrets.registration_shared_secret

    def __repr__(self) -> str:
        return (
            f"<Homeserver {self.name} {self.server_name} db={self.db} pid={self.pid}>"
        )

    # -- config --------------------------------------------------------------

    def database_config(self) -> dict[str, Any]:
        return hsconfig.database_config(self.db, self.sqlite_path, self.database_name)

    def build_config(self) -> dict[str, Any]:
        """The full homeserver.yaml content (extra_config already merged)."""
        return hsconfig.homeserver_config(
            workdir=self.workdir,
            server_name=self.server_name,
            public_baseurl=self.client_url + "/",
            listeners=hsconfig.listeners_config(self.federation_port, self.client_port),
            tls=self.tls,
            ca_cert_path=self.ca.cert_path,
            database=self.database_config(),
            log_config_path=self.log_config_path,
            signing_key_path=self.signing_key_path,
            server_secrets=self.secrets,
            modules=hsconfig.modules_config(self.with_module, self.module_config),
            extra_config=self.extra_config,
        )

    def write_config(self) -> None:
        """(Re)write homeserver.yaml from :meth:`build_config`."""
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.build_config(), f, sort_keys=False)

    # -- database --------------------------------------------------------------

    def _ensure_database(self) -> None:
        if self._database_created:
            return
        if self.db == "postgres":
            self.database_name = postgres.pg_pool.take()
            self.write_config()
        elif USE_TEMPLATES and not os.path.exists(self.sqlite_path):
            shutil.copyfile(sqlite_template(), self.sqlite_path)
        self._database_created = True

    def _reset_database(self) -> None:
        if self.db == "postgres":
            if self._database_created and self.database_name:
                postgres.drop_postgres_database(self.database_name)
        else:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.sqlite_path + suffix)
        self._database_created = False

    def drop_database(self, background: bool = False) -> None:
        """Drop the PostgreSQL database (no-op for SQLite). The server must be stopped.

        ``background=True`` queues the drop on a worker thread (waited for at exit
        and by :func:`tests.fedkit.postgres.wait_for_background_drops`).
        ``SPS_KEEP_DATABASES=1`` keeps it (to inspect or measure it afterwards;
        drop it by hand)."""
        if os.environ.get("SPS_KEEP_DATABASES") == "1":
            self._database_created = False
            return
        if self.db == "postgres" and self._database_created and self.database_name:
            if background:
                postgres.dropper.drop(self.database_name)
            else:
                postgres.drop_postgres_database(self.database_name)
        self._database_created = False

    def sql(
        self, statement: str, params: tuple[Any, ...] = ()
    ) -> list[tuple[Any, ...]]:
        """Run one statement on this server's database from outside (placeholders
        ``?``, as Synapse writes them; committed at once) and return its rows.

        For tests that inspect or break what a running server sees."""
        if self.db == "postgres":
            assert self.database_name is not None, "not started yet"
            conn = postgres.pg_connect(self.database_name)
            conn.autocommit = True
            try:
                with conn.cursor() as cur:
                    cur.execute(statement.replace("?", "%s"), params)
                    return list(cur.fetchall()) if cur.description else []
            finally:
                conn.close()
        lite = sqlite3.connect(self.sqlite_path, timeout=30, isolation_level=None)
        try:
            cur = lite.execute(statement, params)
            return list(cur.fetchall())
        finally:
            lite.close()

    # -- process ---------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _running_pid(self) -> int | None:
        return self.pid if self.is_running() else None

    def spawn(self) -> None:
        """Start the Synapse process without waiting for it (see :meth:`wait_ready`)."""
        with self._lock:
            if self._cleaned_up:
                raise RuntimeError(f"{self.name} was cleaned up")
            if self.is_running():
                return
            self._ensure_database()
            self._close_stderr()
            self._stderr_file = open(self.stderr_path, "ab")
            self._log_offset_at_spawn = self.log_offset()
            self._stderr_offset_at_spawn = self._stderr_file.tell()
            self._proc = process.spawn_synapse(
                self.config_path, self.workdir, self._stderr_file, self.env
            )
            self._pgid = self._proc.pid
            self.resources.forget_process()

    def _is_ready(self, pid: int) -> bool:
        """TLS on the federation port, and *our* process holds both ports."""
        return process.speaks_tls(
            self.federation_port, self.ca.cert_path
        ) and process.listens_on(pid, {self.federation_port, self.client_port})

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
                    healthy = process.is_healthy(session, self.client_url)
                if healthy and self._is_ready(proc.pid):
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
        return process.output_tail(
            self.stderr_path,
            getattr(self, "_stderr_offset_at_spawn", 0),
            self.log_path,
            getattr(self, "_log_offset_at_spawn", 0),
            lines,
        )

    def _terminate(self, grace: float) -> None:
        proc = self._proc
        if proc is None:
            return
        process.terminate_group(proc, self._pgid, grace, self.name)
        self._close_stderr()

    def _close_stderr(self) -> None:
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM the process group, SIGKILL after ``timeout`` s. Idempotent."""
        with self._lock:
            self.resources.sample_once()
            self._terminate(grace=timeout)

    def kill(self) -> None:
        """SIGKILL the process group (simulates a crash)."""
        with self._lock:
            self.resources.sample_once()
            self._terminate(grace=0)

    def restart(self, timeout: float = 90) -> Homeserver:
        """Stop and start again, keeping ports, database and files."""
        self.stop()
        return self.start(timeout)

    def cleanup(self, background_drop: bool = False, kill: bool = False) -> None:
        """Stop the server and drop its PostgreSQL database. Idempotent.

        With ``background_drop`` the drop is queued (see :meth:`drop_database`);
        with ``kill`` the server is SIGKILLed instead of stopped gracefully."""
        with self._lock:
            if self._cleaned_up:
                return
            self.stop_sampling()
            if kill:
                self.kill()
            else:
                self.stop()
            try:
                self.drop_database(background=background_drop)
            finally:
                self._cleaned_up = True
                unregister_server(self)

    # -- resource usage (see tests.fedkit.sampling) ----------------------------

    @property
    def samples(self) -> list[tuple[float, int, float]]:
        """(time, rss, cpu seconds) recorded since :meth:`start_sampling`."""
        return self.resources.samples

    def rss_peak_bytes(self) -> int:
        """Peak RSS (VmHWM) plus its helper processes' peaks, bytes (kept after stop)."""
        return self.resources.rss_peak_bytes()

    def rss_bytes(self) -> int:
        """RSS now plus its helper processes', bytes (last value seen after stop)."""
        return self.resources.rss_bytes()

    def reset_rss_peak(self) -> None:
        """Reset the kernel's peak-RSS counter (VmHWM), e.g. before a measured step."""
        self.resources.reset_rss_peak()

    def cpu_seconds(self) -> float:
        """User + system CPU time consumed by the process (and helpers) so far."""
        return self.resources.cpu_seconds()

    def start_sampling(self, interval: float = 0.25) -> None:
        """Record (time, rss, cpu) into :attr:`samples` every ``interval`` s."""
        self.resources.start_sampling(interval)

    def stop_sampling(self) -> None:
        self.resources.stop_sampling()

    # -- logs ------------------------------------------------------------------

    def read_log(self) -> str:
        return process.read_text(self.log_path)

    def log_offset(self) -> int:
        """Current size of the log, to pass as ``since`` to :meth:`wait_for_log`."""
        return process.file_size(self.log_path)

    def wait_for_log(
        self, regex: str | re.Pattern[str], timeout: float = 30, since: int = 0
    ) -> re.Match[str]:
        """Wait until a line matching ``regex`` appears after byte ``since`` of the log."""
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        return process.wait_for_line(self.log_path, pattern, timeout, since, self.name)

    # -- users (see tests.fedkit.users) ---------------------------------------

    def register_user(
        self, localpart: str, admin: bool = False, password: str = "pw"
    ) -> Client:
        """Register a user with the shared-secret admin API and return its client."""
        return users.register_user(
            self.client_url,
            self.registration_shared_secret,
            localpart,
            admin=admin,
            password=password,
        )


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
