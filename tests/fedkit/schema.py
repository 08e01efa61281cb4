"""Synapse's database schema, built once per Synapse version and cached.

A fresh homeserver does not build its schema itself: its database is copied
from a template that already holds it (see :func:`sqlite_template` here and
:func:`tests.fedkit.postgres.postgres_template`), which makes creating one a
matter of a few hundred milliseconds.

Environment:

* ``SPS_FEDKIT_TEMPLATES=0``: let Synapse build its schema from scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
from typing import Any

#: Set to 0 to make every homeserver build its schema from scratch instead of
#: copying a template database.
USE_TEMPLATES = os.environ.get("SPS_FEDKIT_TEMPLATES", "1") != "0"


def synapse_schema_key() -> str:
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


def build_schema(db_config: dict[str, Any]) -> None:
    """Create Synapse's schema in the (empty) database of ``db_config``."""
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


_sqlite_template_lock = threading.Lock()


def sqlite_template() -> str:
    """Path of a cached SQLite file holding a freshly initialised Synapse schema."""
    with _sqlite_template_lock:
        cache_dir = os.path.join(tempfile.gettempdir(), f"fedkit-cache-{os.getuid()}")
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"synapse-{synapse_schema_key()}.db")
        if not os.path.exists(path):
            building = f"{path}.{os.getpid()}.{secrets.token_hex(3)}"
            try:
                build_schema({"name": "sqlite3", "args": {"database": building}})
                os.replace(building, path)
            finally:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(building + suffix)
        return path
