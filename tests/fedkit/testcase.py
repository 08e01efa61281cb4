"""Base class for black-box tests that run real Synapse homeservers.

Example::

    @on_both_databases
    class JoinTests(FederationTestCase):
        def test_join(self) -> None:
            hs1, hs2 = self.make_homeservers(["hs1", "hs2"])
            ...

``on_both_databases`` puts ``JoinTests_sqlite`` and ``JoinTests_postgres`` in the
module (``trial`` collects both); ``SPS_TEST_DATABASES=sqlite`` (comma-separated,
default ``sqlite,postgres``) skips the other variants.

The default suite (what CI runs) is sized to stay under its time budget: a class
decorated ``@on_both_databases(ci_database="postgres")`` runs on that database
only, and ``@on_room_versions("10", "11", "12", ci_rotate=True)`` runs each room
version on one database, in turn (sqlite, postgres, sqlite, ...). The full suite
(``SPS_TEST_FULL=1``, which ``scripts-dev/test --full`` sets) runs every variant.
Classes whose code differs by database (the bulk writers' ``COPY``, the
differential tests) stay on both in every suite.

Each test gets a work directory under ``$SPS_TEST_WORKDIR`` (default
``<tmp>/sps-fedkit``). It is deleted when the test passes and kept, with every
server's config and log, when it fails (the path is printed); set
``SPS_KEEP_WORKDIRS=1`` to keep it always (and ``SPS_KEEP_DATABASES=1`` to keep
the PostgreSQL databases).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
import threading
import unittest
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, cast

from tests.fedkit.certs import KitCA
from tests.fedkit.fakepeer.control_client import FakePeer
from tests.fedkit.homeserver import Homeserver, start_all
from tests.fedkit.hsconfig import DatabaseKind
from tests.fedkit.matrix_client import Client
from tests.fedkit.workers import WorkerHomeserver

ALL_DATABASES: tuple[DatabaseKind, ...] = ("sqlite", "postgres")

_ca_lock = threading.Lock()
_ca: KitCA | None = None


def shared_ca() -> KitCA:
    """One CA for the whole test run (removed at exit)."""
    global _ca
    with _ca_lock:
        if _ca is None:
            directory = tempfile.mkdtemp(prefix="fedkit-ca-")
            atexit.register(shutil.rmtree, directory, True)
            _ca = KitCA(directory)
        return _ca


def selected_databases() -> list[str]:
    """Databases enabled by ``SPS_TEST_DATABASES`` (default: all)."""
    raw = os.environ.get("SPS_TEST_DATABASES", "")
    chosen = [d.strip() for d in raw.split(",") if d.strip()] or list(ALL_DATABASES)
    unknown = set(chosen) - set(ALL_DATABASES)
    if unknown:
        raise ValueError(
            f"SPS_TEST_DATABASES: unknown database(s) {sorted(unknown)}; use sqlite, postgres"
        )
    return chosen


def _workdir_base() -> str:
    base = os.environ.get("SPS_TEST_WORKDIR") or os.path.join(
        tempfile.gettempdir(), "sps-fedkit"
    )
    os.makedirs(base, exist_ok=True)
    return base


class _FailureSpy:
    """Wraps a test result and notes whether anything went wrong."""

    def __init__(self, result: Any) -> None:
        self._result = result
        self.failed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._result, name)

    def addError(self, test: Any, err: Any) -> None:
        self.failed = True
        self._result.addError(test, err)

    def addFailure(self, test: Any, err: Any) -> None:
        self.failed = True
        self._result.addFailure(test, err)

    def addUnexpectedSuccess(self, test: Any) -> None:
        self.failed = True
        self._result.addUnexpectedSuccess(test)

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        if err is not None:
            self.failed = True
        self._result.addSubTest(test, subtest, err)


class FederationTestCase(unittest.TestCase):
    """A test that starts real homeservers; all of them are stopped after the test."""

    #: Database every homeserver of this test uses; set by :func:`on_both_databases`.
    DATABASE: ClassVar[DatabaseKind] = "sqlite"
    #: Room version of the rooms this test creates; set by :func:`on_room_versions`
    #: (None: the creator's default, 10 for the fake peer, 12 for Synapse 1.163).
    ROOM_VERSION: ClassVar[str | None] = None

    _workdir: str | None = None

    @property
    def ca(self) -> KitCA:
        return shared_ca()

    @property
    def workdir(self) -> str:
        """This test's directory (created on first use)."""
        if self._workdir is None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.id().split(".", 1)[-1])[-100:]
            self._workdir = tempfile.mkdtemp(prefix=name + "-", dir=_workdir_base())
        return self._workdir

    def run(self, result: Any = None) -> Any:
        # The verdict is only known once the cleanups (which stop the servers)
        # have run, i.e. after unittest's run(): decide about the work
        # directory here, watching the result for failures.
        own_result = result is None
        if own_result:
            result = self.defaultTestResult()
            result.startTestRun()
        spy = _FailureSpy(result)
        try:
            return super().run(cast(unittest.TestResult, spy))
        finally:
            self._finish_workdir(spy.failed)
            if own_result:
                result.stopTestRun()

    def _finish_workdir(self, failed: bool) -> None:
        if self._workdir is None:
            return
        if failed or os.environ.get("SPS_KEEP_WORKDIRS") == "1":
            sys.stderr.write(
                f"\n[fedkit] {self.id()}: work directory kept: {self._workdir}\n"
            )
        else:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._workdir = None

    def _new_homeserver(self, name: str, with_module: bool, **kw: Any) -> Homeserver:
        kw.setdefault("db", self.DATABASE)
        hs = Homeserver(
            os.path.join(self.workdir, name),
            name,
            self.ca,
            with_module=with_module,
            **kw,
        )
        # The database drop runs in the background; it is waited for at exit.
        self.addCleanup(hs.cleanup, background_drop=True)
        return hs

    def make_homeserver(
        self, name: str = "hs", with_module: bool = True, start: bool = True, **kw: Any
    ) -> Homeserver:
        """A homeserver on :attr:`DATABASE`, started unless ``start=False``.

        ``kw`` go to :class:`Homeserver` (``module_config``, ``extra_config``,
        ``db``, ``env``). It is stopped and its database dropped after the test."""
        hs = self._new_homeserver(name, with_module, **kw)
        if start:
            hs.start()
        return hs

    def make_worker_homeserver(
        self, name: str = "hs", with_module: bool = True, start: bool = True, **kw: Any
    ) -> WorkerHomeserver:
        """A worker deployment (:class:`~tests.fedkit.workers.WorkerHomeserver`:
        main process, workers, nginx) on PostgreSQL, started unless
        ``start=False``; every process is stopped and the database dropped after
        the test. ``kw`` as for :meth:`make_homeserver` (``db`` must be postgres)."""
        kw["db"] = "postgres"
        hs = WorkerHomeserver(
            os.path.join(self.workdir, name),
            name,
            self.ca,
            with_module=with_module,
            **kw,
        )
        self.addCleanup(hs.cleanup, background_drop=True)
        if start:
            hs.start()
        return hs

    def make_homeservers(
        self, names: Iterable[str] | int, with_module: bool = True, **kw: Any
    ) -> list[Homeserver]:
        """Several homeservers with the same options, started in parallel.

        ``names`` is a list of names or a count (``hs1``, ``hs2``, ...)."""
        if isinstance(names, int):
            names = [f"hs{i + 1}" for i in range(names)]
        servers = [self._new_homeserver(name, with_module, **kw) for name in names]
        start_all(servers)
        return servers

    def make_fake_peer(self, name: str = "fakepeer", **kw: Any) -> FakePeer:
        """A started fake federation peer sharing the run's CA; stopped after the test."""
        peer = FakePeer(os.path.join(self.workdir, name), self.ca.directory, **kw)
        self.addCleanup(peer.stop)
        return peer.start()

    def register(self, hs: Homeserver, localpart: str, admin: bool = False) -> Client:
        """Register a user on ``hs``; its HTTP session is closed after the test."""
        client = hs.register_user(localpart, admin=admin)
        self.addCleanup(client.close)
        return client


class DatabaseVariants:
    """What :func:`on_both_databases` leaves under the decorated class's name.

    Not a test case itself, so runners collect only the variants. ``base`` is
    the decorated class, for subclassing."""

    def __init__(
        self,
        base: type[FederationTestCase],
        variants: dict[str, type[FederationTestCase]],
    ):
        self.base = base
        self.variants = variants
        for db, cls in variants.items():
            setattr(self, db, cls)

    def __repr__(self) -> str:
        return f"<DatabaseVariants of {self.base.__name__}: {', '.join(c.__name__ for c in self.variants.values())}>"


def full_suite() -> bool:
    """Whether every database variant runs (``SPS_TEST_FULL=1``), not only the
    default suite's."""
    return os.environ.get("SPS_TEST_FULL") == "1"


def on_both_databases(
    cls: type[FederationTestCase] | None = None,
    *,
    ci_database: DatabaseKind | None = None,
) -> Any:
    """Class decorator: define ``<Name>_sqlite`` and ``<Name>_postgres`` in the caller's module.

    Variants not listed in ``SPS_TEST_DATABASES`` are marked skipped. With
    ``ci_database``, the other database's variant runs in the full suite only
    (see :func:`full_suite`)."""
    if ci_database is not None and ci_database not in ALL_DATABASES:
        raise ValueError(f"ci_database: unknown database {ci_database!r}")
    caller_globals = sys._getframe(1).f_globals

    def decorate(cls: type[FederationTestCase]) -> Any:
        return _database_variants(cls, caller_globals, ci_database)

    return decorate if cls is None else decorate(cls)


def on_room_versions(
    *versions: str, ci_rotate: bool = False
) -> Callable[[type[FederationTestCase]], Any]:
    """Class decorator, for tests whose rooms are the fake peer's: define
    ``<Name>_v<version>_sqlite`` and ``..._postgres`` for each room version (the
    class reads ``ROOM_VERSION``). Use instead of :func:`on_both_databases`.

    With ``ci_rotate``, the default suite runs the i-th version on the i-th
    database in turn (every version once, both databases covered); the full
    suite runs all of them on both."""

    def decorate(cls: type[FederationTestCase]) -> Any:
        caller_globals = sys._getframe(1).f_globals
        by_version = {}
        for i, version in enumerate(versions):
            name = f"{cls.__name__}_v{version}"
            variant = type(
                name,
                (cls,),
                {
                    "ROOM_VERSION": version,
                    "__module__": cls.__module__,
                    "__qualname__": name,
                },
            )
            ci_database = ALL_DATABASES[i % len(ALL_DATABASES)] if ci_rotate else None
            by_version[version] = _database_variants(
                variant, caller_globals, ci_database
            )
        return by_version

    return decorate


def _database_variants(
    cls: type[FederationTestCase],
    caller_globals: dict[str, Any],
    ci_database: DatabaseKind | None = None,
) -> DatabaseVariants:
    selected = selected_databases()
    full = full_suite()
    variants: dict[str, type[FederationTestCase]] = {}
    for db in ALL_DATABASES:
        name = f"{cls.__name__}_{db}"
        variant = type(
            name,
            (cls,),
            {"DATABASE": db, "__module__": cls.__module__, "__qualname__": name},
        )
        if db not in selected:
            variant = unittest.skip(f"{db} is not in SPS_TEST_DATABASES")(variant)
        elif ci_database is not None and db != ci_database and not full:
            variant = unittest.skip(
                f"{db}: in the full suite only (scripts-dev/test --full); "
                f"the default suite runs this class on {ci_database}"
            )(variant)
        caller_globals[name] = variant
        variants[db] = variant
    return DatabaseVariants(cls, variants)
