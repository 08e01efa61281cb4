"""PostgreSQL databases for kit homeservers: a schema template, a pool, drops.

Every PostgreSQL homeserver gets a fresh database (``fedkit_<random>``), cloned
from a template that already holds Synapse's schema (:func:`postgres_template`).
A :class:`PostgresDatabasePool` creates a few of them ahead of time on a
background thread, and a background dropper drops them after use without
holding up the test.

Environment:

* ``SPS_PG_HOST`` / ``SPS_PG_PORT`` / ``SPS_PG_USER`` / ``SPS_PG_PASSWORD``: the
  PostgreSQL cluster (default ``127.0.0.1:5432``, user ``postgres``, trust auth);
* ``SPS_PG_POOL_SIZE``: databases pre-created in the background (default 2).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from typing import Any

from tests.fedkit.schema import USE_TEMPLATES, build_schema, synapse_schema_key

logger = logging.getLogger(__name__)

#: Connection parameters of the PostgreSQL cluster the kit creates databases on.
PG_HOST = os.environ.get("SPS_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("SPS_PG_PORT", "5432"))
PG_USER = os.environ.get("SPS_PG_USER", "postgres")
PG_PASSWORD = os.environ.get("SPS_PG_PASSWORD") or None


def pg_connect(dbname: str = "postgres") -> Any:
    """An autocommit psycopg2 connection to ``dbname`` on the kit's cluster."""
    import psycopg2

    conn = psycopg2.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, password=PG_PASSWORD, dbname=dbname
    )
    conn.autocommit = True
    return conn


def pg_args(dbname: str) -> dict[str, Any]:
    """Synapse's ``database.args`` for ``dbname`` on the kit's cluster."""
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
        name = f"fedkit_template_{synapse_schema_key()}"
        conn = pg_connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_lock(hashtext('fedkit_template'))")
                try:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                    if cur.fetchone() is None:
                        _build_template(cur, name)
                finally:
                    cur.execute(
                        "SELECT pg_advisory_unlock(hashtext('fedkit_template'))"
                    )
        finally:
            conn.close()
        _pg_template_name = name
        return name


def _build_template(cur: Any, name: str) -> None:
    """Build the template under another name, then rename it to ``name``."""
    building = f"{name}_build_{secrets.token_hex(3)}"
    cur.execute(
        f'CREATE DATABASE "{building}" TEMPLATE template0'
        " ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    try:
        build_schema({"name": "psycopg2", "args": pg_args(building)})
    except BaseException:
        cur.execute(f'DROP DATABASE IF EXISTS "{building}" WITH (FORCE)')
        raise
    # Renaming makes the finished template appear atomically.
    cur.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')


def create_postgres_database(name: str | None = None) -> str:
    """Create an empty-of-data Synapse database (``C`` collation) and return its name."""
    name = name or f"fedkit_{secrets.token_hex(6)}"
    template = postgres_template() if USE_TEMPLATES else "template0"
    conn = pg_connect()
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
    conn = pg_connect()
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


def postgres_database_exists(name: str) -> bool:
    conn = pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            return cur.fetchone() is not None
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


class BackgroundDropper:
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


#: The process-wide dropper (``Homeserver.drop_database(background=True)``).
dropper = BackgroundDropper()

#: The process-wide pool every PostgreSQL homeserver takes its database from.
pg_pool = PostgresDatabasePool(int(os.environ.get("SPS_PG_POOL_SIZE", "2")))


def wait_for_background_drops() -> None:
    """Block until databases dropped with ``background=True`` are gone."""
    dropper.wait()
