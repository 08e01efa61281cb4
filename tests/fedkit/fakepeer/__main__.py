"""Entry point: ``python -m tests.fedkit.fakepeer --workdir DIR --ca-dir CADIR``.

Starts the control API on 127.0.0.1 (``--control-port``, 0 = any free port),
writes ``DIR/ready.json`` = ``{"control_port": N, "pid": P}`` atomically once
listening, logs to ``DIR/fakepeer.log`` and runs until SIGTERM/SIGINT, on which
every listener is closed before the process exits.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, cast


def _setup_logging(workdir: str, level: str) -> None:
    log_path = os.path.join(workdir, "fakepeer.log")
    handler = logging.FileHandler(log_path)
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("fakepeer").setLevel(getattr(logging, level))

    from twisted.logger import STDLibLogObserver, globalLogBeginner

    globalLogBeginner.beginLoggingTo(
        [cast(Any, STDLibLogObserver(name="twisted"))], redirectStandardIO=False
    )


def _write_ready(workdir: str, control_port: int) -> None:
    path = os.path.join(workdir, "ready.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"control_port": control_port, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Run the fake peer until terminated."""
    parser = argparse.ArgumentParser(prog="python -m tests.fedkit.fakepeer")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--ca-dir", required=True)
    parser.add_argument("--control-port", type=int, default=0)
    parser.add_argument(
        "--verify-requests",
        action="store_true",
        help="verify X-Matrix signatures of incoming requests (fetching origin keys)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    os.makedirs(args.workdir, exist_ok=True)
    _setup_logging(args.workdir, args.log_level.upper())
    log = logging.getLogger("fakepeer")

    from twisted.internet import reactor
    from twisted.web.server import Site

    from .control import ControlAPI
    from .peer import Peer

    r: Any = reactor
    r.suggestThreadPoolSize(4)
    peer = Peer(r, args.ca_dir, verify_requests=args.verify_requests)
    site = Site(ControlAPI(peer))
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    port = r.listenTCP(args.control_port, site, interface="127.0.0.1")
    control_port = port.getHost().port

    async def _shutdown() -> None:
        log.info("shutting down")
        await port.stopListening()
        await peer.shutdown()

    from twisted.internet import defer

    r.addSystemEventTrigger(
        "before", "shutdown", lambda: defer.ensureDeferred(_shutdown())
    )
    _write_ready(args.workdir, control_port)
    log.info("fake peer ready: control port %d, pid %d", control_port, os.getpid())
    r.run()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
