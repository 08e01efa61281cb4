"""A Synapse worker deployment behind nginx, as one kit homeserver.

:class:`WorkerHomeserver` is a :class:`~tests.fedkit.homeserver.Homeserver`
(same server name scheme, same ``client_url``/``federation_url``, users, logs of
the main process, database) made of several real processes on PostgreSQL with
Redis replication:

* ``main``: the main process (``synapse.app.homeserver``): admin API, event
  persistence, joins and the resync engine, and whatever nginx does not route
  elsewhere;
* ``federation1`` and ``federation2``: generic workers serving the federation
  reader paths of Synapse's worker documentation (``/send_join``, ``/state``,
  ``/state_ids``, ``/event``, ... round robin; inbound ``/send`` by source
  address);
* ``synchrotron``: a generic worker serving ``/sync`` (and ``/events``,
  ``/initialSync``);
* ``client_reader``: a generic worker serving the client reads, event sending,
  login and the module's ``/_matrix/client/unstable/org.matrix.msc2775/...``;
* ``federation_sender``: sends every outgoing federation transaction
  (``federation_sender_instances``);
* ``background``: runs the background tasks (``run_background_tasks_on``).

nginx listens on the two ports a single-process kit server listens on: the
federation port speaks TLS with a certificate from the kit's CA (so the server
name stays ``127.0.0.1:<federation port>`` and other servers federate with it
over loopback TLS exactly as with a single process), the client port plain
HTTP. Every Synapse process listens on plain HTTP on loopback behind it.

Every process loads the module (the shared homeserver.yaml has the ``modules``
section). Each writes its own log (``<name>.log``); nginx writes
``nginx/access.log`` with the upstream that answered each request.

Needs PostgreSQL, Redis (``SPS_REDIS_HOST``/``SPS_REDIS_PORT``, default
127.0.0.1:6379) and nginx (:func:`unavailable_reason` says what is missing).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import requests
import yaml

from tests.fedkit import hsconfig, process
from tests.fedkit.certs import KitCA
from tests.fedkit.homeserver import Homeserver, HomeserverStartError
from tests.fedkit.ports import free_port

REDIS_HOST = os.environ.get("SPS_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("SPS_REDIS_PORT", "6379"))

GENERIC_WORKER = "synapse.app.generic_worker"

#: Federation reader paths (Synapse's worker documentation), round robin over
#: the federation workers.
FEDERATION_READER_PATHS = (
    r"^/_matrix/federation/v1/version$",
    r"^/_matrix/federation/v1/event/",
    r"^/_matrix/federation/v1/state/",
    r"^/_matrix/federation/v1/state_ids/",
    r"^/_matrix/federation/v1/backfill/",
    r"^/_matrix/federation/v1/get_missing_events/",
    r"^/_matrix/federation/v1/publicRooms",
    r"^/_matrix/federation/v1/query/",
    r"^/_matrix/federation/v1/make_join/",
    r"^/_matrix/federation/v1/make_leave/",
    r"^/_matrix/federation/(v1|v2)/send_join/",
    r"^/_matrix/federation/(v1|v2)/send_leave/",
    r"^/_matrix/federation/v1/make_knock/",
    r"^/_matrix/federation/v1/send_knock/",
    r"^/_matrix/federation/(v1|v2)/invite/",
    r"^/_matrix/federation/v1/event_auth/",
    r"^/_matrix/federation/v1/timestamp_to_event/",
    r"^/_matrix/federation/v1/exchange_third_party_invite/",
    r"^/_matrix/federation/v1/user/devices/",
    r"^/_matrix/key/v2/query",
    r"^/_matrix/federation/v1/hierarchy/",
)

#: A federation path every process answers (routing checks ask it).
VERSION_PATH = "/_matrix/federation/v1/version"

#: Inbound transactions: balanced by source address, so that one remote
#: server's transactions go to one process.
FEDERATION_INBOUND_PATHS = (r"^/_matrix/federation/v1/send/",)

SYNC_PATHS = (
    r"^/_matrix/client/(r0|v3)/sync$",
    r"^/_matrix/client/(api/v1|r0|v3)/events$",
    r"^/_matrix/client/(api/v1|r0|v3)/initialSync$",
    r"^/_matrix/client/(api/v1|r0|v3)/rooms/[^/]+/initialSync$",
)

_C = r"^/_matrix/client/(api/v1|r0|v3|unstable)"
CLIENT_READER_PATHS = (
    # The module's client API (progress of a room's resync).
    r"^/_matrix/client/unstable/org\.matrix\.msc2775/",
    # Client reads.
    _C + r"/publicRooms$",
    _C + r"/rooms/.*/joined_members$",
    _C + r"/rooms/.*/context/.*$",
    _C + r"/rooms/.*/members$",
    _C + r"/rooms/.*/state$",
    _C + r"/rooms/.*/messages$",
    _C + r"/rooms/.*/event/",
    _C + r"/joined_rooms$",
    _C + r"/directory/room/.*$",
    r"^/_matrix/client/v1/rooms/.*/hierarchy$",
    r"^/_matrix/client/(v1|unstable)/rooms/.*/relations/",
    r"^/_matrix/client/v1/rooms/.*/threads$",
    r"^/_matrix/client/(r0|v3|unstable)/account/whoami$",
    r"^/_matrix/client/versions$",
    r"^/_matrix/client/(r0|v3|unstable)/capabilities$",
    r"^/_matrix/client/(r0|v3|unstable)/user/.*/filter(/|$)",
    # Login, and event sending (which the worker hands to the main process).
    _C + r"/login$",
    _C + r"/createRoom$",
    _C + r"/rooms/.*/redact",
    _C + r"/rooms/.*/send",
    _C + r"/rooms/.*/state/",
    _C + r"/rooms/.*/(join|invite|leave|ban|unban|kick)$",
    _C + r"/join/",
    _C + r"/profile/",
)


@dataclass
class WorkerProcess:
    """One ``synapse.app.generic_worker`` process of a deployment."""

    name: str
    workdir: str
    #: Its HTTP listener (client and/or federation, or just /health).
    http_port: int
    #: Resources of that listener.
    resources: list[str]
    proc: subprocess.Popen[bytes] | None = None
    _stderr_file: Any = None
    _log_offset_at_spawn: int = 0
    _stderr_offset_at_spawn: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.yaml")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.log")

    @property
    def log_config_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.log.config.yaml")

    @property
    def stderr_path(self) -> str:
        return os.path.join(self.workdir, f"{self.name}.stderr")

    @property
    def url(self) -> str:
        """Its own HTTP listener, bypassing nginx."""
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self) -> dict[str, Any]:
        return {
            "worker_app": GENERIC_WORKER,
            "worker_name": self.name,
            "worker_listeners": [
                {
                    "type": "http",
                    "port": self.http_port,
                    "bind_addresses": ["127.0.0.1"],
                    "x_forwarded": True,
                    "resources": [{"names": self.resources, "compress": False}],
                }
            ],
            "worker_log_config": self.log_config_path,
            **self.extra,
        }

    def write_files(self) -> None:
        with open(self.log_config_path, "w") as f:
            yaml.safe_dump(hsconfig.log_config(self.log_path), f, sort_keys=False)
        with open(self.config_path, "w") as f:
            yaml.safe_dump(self.config(), f, sort_keys=False)

    def spawn(self, shared_config_path: str, env: dict[str, str]) -> None:
        if self.is_running():
            return
        self.close_stderr()
        self._stderr_file = open(self.stderr_path, "ab")
        self._stderr_offset_at_spawn = self._stderr_file.tell()
        self._log_offset_at_spawn = process.file_size(self.log_path)
        self.proc = process.spawn_synapse(
            shared_config_path,
            self.workdir,
            self._stderr_file,
            env,
            app=GENERIC_WORKER,
            extra_config_paths=[self.config_path],
        )

    def failure_tail(self, lines: int = 40) -> str:
        return process.output_tail(
            self.stderr_path,
            self._stderr_offset_at_spawn,
            self.log_path,
            self._log_offset_at_spawn,
            lines,
        )

    def terminate(self, grace: float) -> None:
        if self.proc is not None:
            process.terminate_group(self.proc, self.proc.pid, grace, self.name)
        self.close_stderr()

    def close_stderr(self) -> None:
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None


def nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None
    )


def redis_reachable() -> bool:
    """True if something answers a Redis PING at the configured address."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def postgres_reachable() -> bool:
    try:
        from tests.fedkit.postgres import pg_connect

        pg_connect().close()
        return True
    except Exception:
        return False


def unavailable_reason() -> str | None:
    """Why a worker deployment cannot run here (None: it can)."""
    from tests.fedkit.testcase import selected_databases

    if "postgres" not in selected_databases():
        return "workers need PostgreSQL, not in SPS_TEST_DATABASES"
    try:
        import hiredis  # noqa: F401
        import txredisapi  # noqa: F401
    except ImportError:
        return "Synapse's Redis support is not installed (matrix-synapse[redis])"
    if nginx_binary() is None:
        return "nginx is not installed (scripts-dev/bootstrap installs it)"
    if not redis_reachable():
        return f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}"
    if not postgres_reachable():
        return "PostgreSQL is not reachable"
    return None


def _location_block(paths: tuple[str, ...], upstream: str) -> str:
    return "".join(
        f"        location ~ {path} {{ proxy_pass http://{upstream}; }}\n"
        for path in paths
    )


class WorkerHomeserver(Homeserver):
    """A main process, six generic workers and nginx, on PostgreSQL and Redis.

    Behaves like a :class:`Homeserver` (``start``, ``stop``, ``restart``,
    ``cleanup``, ``register_user``, ``sql``, the main process's log); the
    workers are in :attr:`workers` by name, and :meth:`restart_worker`,
    :meth:`worker_log` and :meth:`wait_for_worker_log` reach one of them.
    """

    FEDERATION_WORKERS = ("federation1", "federation2")
    SYNC_WORKER = "synchrotron"
    CLIENT_WORKER = "client_reader"
    SENDER = "federation_sender"
    BACKGROUND = "background"

    def __init__(self, workdir: str, name: str, ca: KitCA, **kw: Any) -> None:
        if kw.setdefault("db", "postgres") != "postgres":
            raise ValueError("Synapse workers need PostgreSQL")
        self.nginx_dir = os.path.join(os.path.abspath(workdir), "nginx")
        self._nginx: subprocess.Popen[bytes] | None = None
        self._nginx_output: Any = None
        # Another deployment's (or test run's) entries in Synapse's Redis cache
        # are keyed by state group only: a database of its own makes clashes
        # unlikely.
        self.redis_dbid = random.randrange(1, 16)
        self.workers: dict[str, WorkerProcess] = {}
        #: Who serves the federation paths: ``"workers"`` (the federation
        #: workers, as Synapse's documentation routes them) or ``"main"`` (the
        #: main process alone, as a single-process homeserver would);
        #: :meth:`route_federation` switches it on a running deployment.
        self.federation_to = "workers"
        super().__init__(workdir, name, ca, **kw)

    # -- ports and files -----------------------------------------------------

    def _allocate_ports(self) -> None:
        # nginx takes the two ports the kit's servers always have.
        super()._allocate_ports()
        self.main_http_port = free_port()
        self.main_replication_port = free_port()
        workdir = self.workdir
        both = ["client", "federation"]
        self.workers = {
            name: WorkerProcess(name, workdir, free_port(), both)
            for name in self.FEDERATION_WORKERS
        }
        self.workers[self.SYNC_WORKER] = WorkerProcess(
            self.SYNC_WORKER, workdir, free_port(), ["client"]
        )
        self.workers[self.CLIENT_WORKER] = WorkerProcess(
            self.CLIENT_WORKER, workdir, free_port(), ["client"]
        )
        for name in (self.SENDER, self.BACKGROUND):
            self.workers[name] = WorkerProcess(name, workdir, free_port(), ["health"])

    @property
    def main_url(self) -> str:
        """The main process's own HTTP listener, bypassing nginx."""
        return f"http://127.0.0.1:{self.main_http_port}"

    def build_config(self) -> dict[str, Any]:
        config = hsconfig.homeserver_config(
            workdir=self.workdir,
            server_name=self.server_name,
            public_baseurl=self.client_url + "/",
            listeners=[
                {
                    "port": self.main_http_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": True,
                    "resources": [
                        {
                            "names": ["client", "federation", "keys", "openid"],
                            "compress": False,
                        }
                    ],
                },
                {
                    "port": self.main_replication_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "resources": [{"names": ["replication"], "compress": False}],
                },
            ],
            tls=self.tls,
            ca_cert_path=self.ca.cert_path,
            database=self.database_config(),
            log_config_path=self.log_config_path,
            signing_key_path=self.signing_key_path,
            server_secrets=self.secrets,
            modules=hsconfig.modules_config(self.with_module, self.module_config),
            extra_config={},
        )
        # No TLS listener in Synapse: nginx terminates it with these files.
        config.pop("tls_certificate_path", None)
        config.pop("tls_private_key_path", None)
        config.update(
            {
                "redis": {
                    "enabled": True,
                    "host": REDIS_HOST,
                    "port": REDIS_PORT,
                    "dbid": self.redis_dbid,
                },
                "instance_map": {
                    "main": {"host": "127.0.0.1", "port": self.main_replication_port}
                },
                "federation_sender_instances": [self.SENDER],
                "run_background_tasks_on": self.BACKGROUND,
            }
        )
        return hsconfig.deep_merge(config, self.extra_config)

    def write_config(self) -> None:
        super().write_config()
        for worker in self.workers.values():
            worker.write_files()
        self._write_nginx_config()

    def _write_nginx_config(self) -> None:
        os.makedirs(self.nginx_dir, exist_ok=True)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(self.nginx_dir, sub), exist_ok=True)
        d = self.nginx_dir
        w = self.workers
        fed_ports = (
            [w[n].http_port for n in self.FEDERATION_WORKERS]
            if self.federation_to == "workers"
            else [self.main_http_port]
        )
        fed = "".join(f"        server 127.0.0.1:{port};\n" for port in fed_ports)
        user = "user root;\n" if os.geteuid() == 0 else ""
        locations = (
            _location_block(FEDERATION_READER_PATHS, "federation_reader")
            + _location_block(FEDERATION_INBOUND_PATHS, "federation_inbound")
            + _location_block(SYNC_PATHS, "synchrotron")
            + _location_block(CLIENT_READER_PATHS, "client_reader")
        )
        conf = f"""# Generated by tests.fedkit.workers for {self.name} ({self.server_name}).
{user}worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format kit '$remote_addr "$request" $status upstream=$upstream_addr '
                   'time=$request_time';
    access_log {d}/access.log kit;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    client_max_body_size 100M;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $remote_addr;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_read_timeout 1800s;
    proxy_send_timeout 1800s;

    upstream main {{ server 127.0.0.1:{self.main_http_port}; }}
    upstream federation_reader {{
{fed}    }}
    upstream federation_inbound {{
        hash $remote_addr consistent;
{fed}    }}
    upstream synchrotron {{ server 127.0.0.1:{w[self.SYNC_WORKER].http_port}; }}
    upstream client_reader {{ server 127.0.0.1:{w[self.CLIENT_WORKER].http_port}; }}

    server {{
        listen 127.0.0.1:{self.federation_port} ssl;
        ssl_certificate {self.tls.cert_path};
        ssl_certificate_key {self.tls.key_path};
{locations}        location / {{ proxy_pass http://main; }}
    }}
    server {{
        listen 127.0.0.1:{self.client_port};
{locations}        location / {{ proxy_pass http://main; }}
    }}
}}
"""
        with open(os.path.join(d, "nginx.conf"), "w") as f:
            f.write(conf)

    # -- processes -------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        return dict(self.env)

    def _is_ready(self, pid: int) -> bool:
        return process.listens_on(
            pid, {self.main_http_port, self.main_replication_port}
        )

    def wait_ready(self, timeout: float = 90) -> None:
        """The main process, then every worker and nginx, each answering."""
        proc = self._proc
        if proc is None:
            raise RuntimeError(f"{self.name} was not spawned")
        deadline = time.monotonic() + timeout
        session = requests.Session()
        session.trust_env = False
        try:
            self._wait_one(
                "main",
                proc,
                lambda: (
                    process.is_healthy(session, self.main_url)
                    and self._is_ready(proc.pid)
                ),
                deadline,
                self._failure_tail,
            )
            for worker in self.workers.values():
                worker.spawn(self.config_path, self._env())
            self._spawn_nginx()
            for worker in self.workers.values():
                wp = worker.proc
                assert wp is not None
                self._wait_one(
                    worker.name,
                    wp,
                    lambda w=worker, p=wp: (
                        process.is_healthy(session, w.url)
                        and process.listens_on(p.pid, {w.http_port})
                    ),
                    deadline,
                    worker.failure_tail,
                )
            nginx = self._nginx
            assert nginx is not None
            self._wait_one(
                "nginx",
                nginx,
                lambda: (
                    process.speaks_tls(self.federation_port, self.ca.cert_path)
                    and process.is_healthy(session, self.client_url)
                ),
                deadline,
                self._nginx_tail,
            )
        finally:
            session.close()
        self._ever_started = True

    def _wait_one(
        self,
        label: str,
        proc: subprocess.Popen[bytes],
        ready: Any,
        deadline: float,
        tail: Any,
    ) -> None:
        while not ready():
            if proc.poll() is not None:
                message = (
                    f"{self.name}: {label} exited with code {proc.returncode}"
                    f" while starting\n{tail()}"
                )
                self._terminate(grace=5)
                raise HomeserverStartError(message)
            if time.monotonic() > deadline:
                message = f"{self.name}: {label} not ready in time\n{tail()}"
                self._terminate(grace=5)
                raise HomeserverStartError(message)
            time.sleep(0.1)

    def _spawn_nginx(self) -> None:
        if self._nginx is not None and self._nginx.poll() is None:
            return
        binary = nginx_binary()
        if binary is None:
            raise HomeserverStartError("nginx is not installed")
        if self._nginx_output is not None:
            self._nginx_output.close()
        self._nginx_output = open(os.path.join(self.nginx_dir, "stderr"), "ab")
        self._nginx = process.spawn_command(
            [binary, "-p", self.nginx_dir, "-c", "nginx.conf"],
            self.nginx_dir,
            self._nginx_output,
        )

    def route_federation(self, to: str, timeout: float = 30) -> None:
        """Send the federation reader and inbound paths to ``to``
        (``"workers"`` or ``"main"``) from now on: nginx's configuration is
        rewritten and reloaded (requests in flight finish where they are)."""
        if to not in ("workers", "main"):
            raise ValueError(f"route_federation to {to!r}: 'workers' or 'main'")
        binary = nginx_binary()
        if binary is None or self._nginx is None or self._nginx.poll() is not None:
            raise RuntimeError(f"{self.name}: nginx is not running")
        self.federation_to = to
        self._write_nginx_config()
        subprocess.run(
            [binary, "-p", self.nginx_dir, "-c", "nginx.conf", "-s", "reload"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        # nginx answers with the new configuration once its new worker runs:
        # ask until a federation reader path reaches the expected process.
        expected = set(self.FEDERATION_WORKERS) if to == "workers" else {"main"}
        deadline = time.monotonic() + timeout
        session = requests.Session()
        session.trust_env = False
        try:
            while True:
                offset = self.access_log_offset()
                session.get(
                    f"{self.federation_url}{VERSION_PATH}",
                    verify=self.ca.cert_path,
                    timeout=10,
                )
                time.sleep(0.1)  # nginx logs a request once it has answered
                served_by = self.upstreams(VERSION_PATH, since=offset)
                if served_by and served_by <= expected:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: federation not routed to {to}")
                time.sleep(0.2)
        finally:
            session.close()

    def _nginx_tail(self) -> str:
        return process.output_tail(
            os.path.join(self.nginx_dir, "stderr"),
            0,
            os.path.join(self.nginx_dir, "error.log"),
            0,
            40,
        )

    def _terminate(self, grace: float) -> None:
        # nginx first (no new requests), then the workers, then main.
        if self._nginx is not None:
            process.terminate_group(self._nginx, self._nginx.pid, grace, "nginx")
        if self._nginx_output is not None:
            self._nginx_output.close()
            self._nginx_output = None
        for worker in self.workers.values():
            worker.terminate(grace)
        super()._terminate(grace)

    @property
    def pids(self) -> dict[str, int]:
        """Every running process of the deployment, by name (``nginx`` too)."""
        result: dict[str, int] = {}
        if self.is_running() and self.pid is not None:
            result["main"] = self.pid
        for name, worker in self.workers.items():
            if worker.is_running() and worker.pid is not None:
                result[name] = worker.pid
        if self._nginx is not None and self._nginx.poll() is None:
            result["nginx"] = self._nginx.pid
        return result

    def restart_worker(self, name: str, timeout: float = 90) -> None:
        """Stop one worker and start it again (the rest keeps running)."""
        worker = self.workers[name]
        worker.terminate(grace=15)
        worker.spawn(self.config_path, self._env())
        wp = worker.proc
        assert wp is not None
        session = requests.Session()
        session.trust_env = False
        try:
            self._wait_one(
                name,
                wp,
                lambda: (
                    process.is_healthy(session, worker.url)
                    and process.listens_on(wp.pid, {worker.http_port})
                ),
                time.monotonic() + timeout,
                worker.failure_tail,
            )
        finally:
            session.close()

    # -- logs --------------------------------------------------------------------

    def worker_log(self, name: str) -> str:
        """A worker's whole log (``main``: the main process's)."""
        if name == "main":
            return self.read_log()
        return process.read_text(self.workers[name].log_path)

    def worker_log_offset(self, name: str) -> int:
        """Size of a worker's log now, as ``since`` for :meth:`wait_for_worker_log`."""
        if name == "main":
            return self.log_offset()
        return process.file_size(self.workers[name].log_path)

    def wait_for_worker_log(
        self, name: str, regex: str, timeout: float = 30, since: int = 0
    ) -> re.Match[str]:
        path = self.log_path if name == "main" else self.workers[name].log_path
        return process.wait_for_line(path, re.compile(regex), timeout, since, name)

    @property
    def access_log_path(self) -> str:
        return os.path.join(self.nginx_dir, "access.log")

    def access_log(self, since: int = 0) -> str:
        """nginx's access log after byte ``since``: one line per request, with
        the upstream that answered it."""
        return process.read_from(self.access_log_path, since)

    def access_log_offset(self) -> int:
        """Size of nginx's access log now, as ``since`` for :meth:`upstreams`."""
        return process.file_size(self.access_log_path)

    def upstreams(self, path_regex: str, since: int = 0) -> set[str]:
        """The processes (``main`` or a worker name) nginx sent the requests
        whose path starts with a match of ``path_regex`` to, after byte
        ``since`` of its access log (nginx logs a request once answered)."""
        names = set()
        for line in self.access_log(since).splitlines():
            if re.search(rf"\"[A-Z]+ {path_regex}", line):
                for port in re.findall(r"upstream=127\.0\.0\.1:(\d+)", line):
                    names.add(self.process_of_port(int(port)) or port)
        return names

    def process_of_port(self, port: int) -> str | None:
        """Which process (``main`` or a worker name) listens on ``port``."""
        if port == self.main_http_port:
            return "main"
        for name, worker in self.workers.items():
            if worker.http_port == port:
                return name
        return None
