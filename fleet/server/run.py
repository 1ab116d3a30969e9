"""Run the device API under uvicorn: ``fleet server [--listen H:P] [--workers N]``.

TLS is on unless ``--insecure`` (the lab and the benchmark's plain-HTTP comparison): the
certificate and key from ``--tls-cert/--tls-key``, by default the ones ``fleet server
init-tls`` made under the controller home. Each worker is its own process with its own
registry connection; they share the home (server secret, signing key, escrow key)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fleet.core import errors
from fleet.home import FleetHome
from fleet.server.tls import tls_paths

__all__ = ["ServeOptions", "serve"]


@dataclass(frozen=True)
class ServeOptions:
    host: str = "0.0.0.0"
    port: int = 8443
    workers: int = 1
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    log_level: str = "warning"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[::1]:PORT`` or ``:PORT``; UsageError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.UsageError(f"--listen {text!r}: give HOST:PORT (e.g. 0.0.0.0:8443)")
    return (host.strip("[]") or "0.0.0.0"), int(port)


def serve(home: FleetHome, opts: ServeOptions) -> None:
    """Start uvicorn in the foreground (returns when it stops). KeyMaterialError when TLS
    is asked for and there is no certificate (run ``fleet server init-tls``)."""
    import uvicorn

    cert, key = opts.tls_cert, opts.tls_key
    if not opts.insecure:
        paths = tls_paths(home)
        cert, key = cert or paths.cert, key or paths.key
        for p in (cert, key):
            if not p.is_file():
                raise errors.KeyMaterialError(
                    f"no TLS certificate/key at {p}; run `fleet server init-tls` (or pass "
                    "--tls-cert/--tls-key)", path=str(p))
    os.environ["FLEET_HOME"] = str(home.path)  # the workers read their settings from here
    if home.db_override:
        os.environ["FLEET_DB"] = home.db_override
    uvicorn.run("fleet.server.app:factory", factory=True, host=opts.host, port=opts.port,
                workers=opts.workers, log_level=opts.log_level, access_log=False,
                ssl_certfile=str(cert) if cert and not opts.insecure else None,
                ssl_keyfile=str(key) if key and not opts.insecure else None,
                timeout_graceful_shutdown=5)
