"""Check-ins per second and latency of ``fleet server`` at 1k, 10k and 100k enrolled devices.

A real server (``fleet server``, uvicorn, TLS with the ``init-tls`` CA, ``--workers``) on
a private port over a registry holding N enrolled devices (SQLite in a temp home, or the
PostgreSQL of ``FLEET_DB``); a load generator in a second process (asyncio + httpx,
keep-alive connections) runs ``--clients`` simulated devices, each authenticating once
(signed challenge -> bearer token) and then checking in back to back for ``--duration``
seconds; every device has a desired state (one model) that the server signs at each
check-in. Prints a table and writes ``bench/results/bench_server.json``.

Target (issue 18): >= 1,000 check-ins/s with p99 < 100 ms on this 2-core machine at
100k devices; the comparison is Mender's default poll (every 30 min: 100k devices make
56 check-ins/s).

    python bench/bench_server.py [--devices 1000,10000,100000] [--clients 64]
                                 [--duration 15] [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fleet(env: dict[str, str], *args: str) -> None:
    subprocess.run([str(BIN / "fleet"), *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def populate(home: Path, n: int, active: int) -> list[dict[str, str]]:
    """N enrolled pull devices in the registry (bulk insert); the first ``active`` have
    real P-256 keys (returned as PEM), the rest keys no client holds. Each gets a desired
    state naming one model."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from sqlalchemy import insert

    from fleet.core.package.keyid import fingerprint_public_key
    from fleet.home import FleetHome
    from fleet.registry import Device, Registry
    from fleet.registry.models import DesiredState
    from fleet.registry.types import utcnow

    reg = Registry.open(FleetHome.from_env(home))
    clients, rows, states = [], [], []
    filler = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    entry = {"name": "bench", "version": 1, "kind": "model", "package_sha256": "a" * 64,
             "size": 1000, "digest": "b" * 64, "envelope": "AAAA", "activate": True,
             "order": None, "deployment": None}
    now = utcnow()
    for i in range(n):
        dev_id = uuid.uuid4()
        if i < active:
            key = ec.generate_private_key(ec.SECP256R1())
            pub = key.public_key()
            pem = pub.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            fp = fingerprint_public_key(pub)
            clients.append({"key": key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()).decode(), "fp": fp})
        else:
            pem, fp = filler, f"SHA256:bench{i:020d}"
        rows.append({"id": dev_id, "name": f"b{i:06d}", "platform": "linux",
                     "uri": f"pull://b{i:06d}", "tags": {}, "status": "enrolled",
                     "public_key": pem, "fingerprint": fp, "facts": {}, "created_at": now,
                     "last_seen": now})
        states.append({"device_id": dev_id, "counter": 1, "models": [entry],
                       "updated_at": now})
    with reg.engine.begin() as conn:
        for i in range(0, n, 5000):
            conn.execute(insert(Device), rows[i:i + 5000])
            conn.execute(insert(DesiredState), states[i:i + 5000])
    reg.close()
    return clients


async def _client(url: str, ctx: ssl.SSLContext, c: dict[str, str], until: float,
                  lat: list[float], errs: list[int]) -> None:
    import httpx
    from cryptography.hazmat.primitives import serialization

    from fleet.core.pull import API_PREFIX, AUTH_TAG, sign_device

    key = serialization.load_pem_private_key(c["key"].encode(), None)
    async with httpx.AsyncClient(base_url=url, verify=ctx, timeout=30) as http:
        ch = (await http.post(f"{API_PREFIX}/auth/challenge",
                              json={"fingerprint": c["fp"]})).json()["challenge"]
        tok = (await http.post(f"{API_PREFIX}/auth/token", json={
            "challenge": ch, "signature": sign_device(key, AUTH_TAG, ch.encode())}))  # type: ignore[arg-type]
        headers = {"Authorization": f"Bearer {tok.json()['token']}"}
        body = {"installed": {}, "disk_free": 10 ** 9, "agent_version": "bench"}
        while time.monotonic() < until:
            t0 = time.perf_counter()
            r = await http.post(f"{API_PREFIX}/checkin", json=body, headers=headers)
            dt = time.perf_counter() - t0
            if r.status_code == 200:
                lat.append(dt)
            else:
                errs.append(r.status_code)


def load(url: str, ca: str, clients_file: str, duration: float) -> dict[str, Any]:
    """The load generator (runs in its own process)."""
    clients = json.loads(Path(clients_file).read_text())
    ctx = ssl.create_default_context(cafile=ca)
    lat: list[float] = []
    errs: list[int] = []

    async def main() -> float:
        until = time.monotonic() + duration
        t0 = time.monotonic()
        await asyncio.gather(*(_client(url, ctx, c, until, lat, errs) for c in clients))
        return time.monotonic() - t0

    wall = asyncio.run(main())
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) > 100 else [float("nan")] * 99
    return {"checkins": len(lat), "errors": len(errs), "wall_s": round(wall, 2),
            "per_s": round(len(lat) / duration, 1), "p50_ms": round(q[49] * 1000, 1),
            "p99_ms": round(q[98] * 1000, 1)}


def run(n: int, clients: int, duration: float, workers: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "FLEET_HOME": str(home), "FLEET_SERVER_RATE_PER_MIN": "1e9",
               "FLEET_SERVER_RATE_BURST": "1e9"}
        _fleet(env, "init")
        _fleet(env, "keys", "init")
        _fleet(env, "server", "init-tls")
        os.environ["FLEET_HOME"] = str(home)
        keys = populate(home, n, clients)
        cf = Path(tmp) / "clients.json"
        cf.write_text(json.dumps(keys))
        port = _port()
        srv = subprocess.Popen([str(BIN / "fleet"), "server", "--listen", f"127.0.0.1:{port}",
                                "--workers", str(workers)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        try:
            url, ca = f"https://127.0.0.1:{port}", str(home / "tls" / "ca.pem")
            import httpx

            for _ in range(600):
                try:
                    httpx.get(url + "/healthz", verify=ssl.create_default_context(cafile=ca))
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            out = subprocess.run([sys.executable, __file__, "--load", url, ca, str(cf),
                                  str(duration)], env=env, capture_output=True, text=True,
                                 check=True)
            return {"devices": n, "clients": clients, "workers": workers,
                    **json.loads(out.stdout)}
        finally:
            os.killpg(srv.pid, signal.SIGTERM)
            srv.wait(30)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        url, ca, cf, dur = sys.argv[2:6]
        print(json.dumps(load(url, ca, cf, float(dur))))
        return
    p = argparse.ArgumentParser()
    p.add_argument("--devices", default="1000,10000,100000")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    rows = [run(int(n), a.clients, a.duration, a.workers) for n in a.devices.split(",")]
    print(f"{'devices':>8} {'check-ins/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
          "   target: >= 1000/s, p99 < 100 ms; Mender default poll at 100k = 56/s")
    for r in rows:
        print(f"{r['devices']:>8} {r['per_s']:>12} {r['p50_ms']:>8} {r['p99_ms']:>8} "
              f"{r['errors']:>7}")
    out = ROOT / "bench" / "results" / "bench_server.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                               "cpus": os.cpu_count(), "db": os.environ.get("FLEET_DB")
                               or "sqlite", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
