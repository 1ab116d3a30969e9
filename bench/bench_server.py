"""Check-ins per second and latency of ``fleet server`` at 1k, 10k and 100k enrolled devices.

A real server (``fleet server``: uvicorn, ``--workers``, TLS with the ``init-tls`` CA) on a
private port, over a registry holding N enrolled pull devices (bulk inserted through the
registry's engine, each with a desired state naming one model) on a private PostgreSQL
cluster (:mod:`fleet.lab.pg`) or, for comparison, SQLite. A load generator in a second
process (asyncio, a minimal HTTP/1.1 client over ``asyncio`` TLS streams: cheaper per
request than httpx, so more of the 2 cores go to the server) keeps ``--clients``
keep-alive connections busy; each request is from a device picked at random among all
N (so the server reads rows spread over the whole table); every device was last seen
30 minutes ago, so each check-in records ``last_seen`` (written behind in batches:
:mod:`fleet.server.seen`), and reports the installed models its facts already hold (the
steady state; a check-in that changes them is written at once, as downloads' reports
are). Bearer tokens are minted with the server secret, as
``/auth/token`` does after the signed challenge (the challenge is not what is measured).
One request in ``--download-every`` is instead a device with a real P-256 key downloading
its 64 KiB package in two HTTP Range requests and uploading a signed report.

Prints per run: check-ins/s, p50/p99 latency, errors, the CPU the server and the load
generator used (seconds of CPU per wall second: the machine has ``os.cpu_count()``), and
writes ``bench/results/server.json``.

Target (issue 18): >= 1,000 check-ins/s with p99 < 100 ms on this 2-core machine at 100k
enrolled devices (Mender's default 30-minute poll: 100k devices make 56 check-ins/s).

    python bench/bench_server.py [--devices 1000,10000,100000] [--clients 32]
                                 [--duration 15] [--workers 2] [--compare]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import resource
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
KEYED = 64  #: devices with real P-256 keys (they download and report)
PKG_BYTES = 64 << 10


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fleet(env: dict[str, str], *args: str) -> None:
    subprocess.run([str(BIN / "fleet"), *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def populate(home: Path, db: str | None, n: int, out: Path) -> None:
    """N enrolled pull devices (bulk insert), a 64 KiB package every desired state names,
    and the load generator's file: per device (id, fingerprint), and the PEM keys of the
    first :data:`KEYED`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from sqlalchemy import insert

    from fleet.core.package.keyid import fingerprint_public_key
    from fleet.home import FleetHome
    from fleet.registry import Device, Registry
    from fleet.registry.models import Artifact, DesiredState
    from fleet.registry.types import utcnow

    reg = Registry.open(FleetHome.from_env(home, db))
    pkg = home / "bench.fpkg"
    pkg.write_bytes(os.urandom(PKG_BYTES))
    sha = hashlib.sha256(pkg.read_bytes()).hexdigest()
    filler = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    entry = {"name": "bench", "version": 1, "kind": "model", "package_sha256": sha,
             "size": PKG_BYTES, "digest": "b" * 64, "envelope": "AAAA", "activate": True,
             "order": None, "deployment": None}
    now = utcnow()
    seen = now - timedelta(minutes=30)  # as at a 30-minute poll: every check-in is seen
    # the status facts the device's previous check-in left (what it reports again)
    facts = {"_installed": {"bench": {"active": 1, "previous": None, "versions": [1],
                                      "digest": None}},
             "_disk_free": 10 ** 9, "_status_at": now.isoformat(timespec="seconds")}
    devs, keys, rows, states = [], [], [], []
    for i in range(n):
        dev_id = uuid.uuid4()
        if i < KEYED:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.public_key().public_bytes(
                serialization.Encoding.PEM,
                serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            fp = fingerprint_public_key(key.public_key())
            keys.append(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()).decode())
        else:
            pem, fp = filler, f"SHA256:bench{i:038d}"
        devs.append([str(dev_id), fp])
        rows.append({"id": dev_id, "name": f"b{i:06d}", "platform": "linux",
                     "uri": f"pull://b{i:06d}", "tags": {}, "status": "ok",
                     "public_key": pem, "fingerprint": fp, "facts": facts, "created_at": now,
                     "last_seen": seen})
        states.append({"device_id": dev_id, "counter": 1, "models": [entry],
                       "updated_at": now})
    with reg.engine.begin() as conn:
        conn.execute(insert(Artifact), [{
            "id": uuid.uuid4(), "name": "bench", "kind": "model", "version": 1,
            "digest": "b" * 64, "package_sha256": sha, "size": PKG_BYTES, "path": str(pkg),
            "manifest": {}, "created_at": now}])
        for i in range(0, n, 5000):
            conn.execute(insert(Device), rows[i:i + 5000])
            conn.execute(insert(DesiredState), states[i:i + 5000])
    if reg.url.startswith("postgresql"):
        with reg.engine.connect() as conn:
            conn.exec_driver_sql("COMMIT")
            conn.exec_driver_sql("ANALYZE")
    reg.close()
    out.write_text(json.dumps({"devices": devs, "keys": keys, "sha": sha}))


# -- the load generator (its own process) ---------------------------------------------------
class Conn:
    """One keep-alive HTTP/1.1 connection over TLS; just enough HTTP for this API
    (uvicorn always sends Content-Length here)."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self.host, self.port, self.ctx = host, port, ctx
        self.r: asyncio.StreamReader | None = None
        self.w: asyncio.StreamWriter | None = None

    async def request(self, method: str, path: str, headers: dict[str, str],
                      body: bytes = b"") -> tuple[int, bytes]:
        if self.w is None:
            self.r, self.w = await asyncio.open_connection(self.host, self.port, ssl=self.ctx)
        assert self.r is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items())
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.w.write(head.encode() + b"\r\n" + body)
        raw = await self.r.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.lower() == "content-length":
                length = int(v)
        return status, await self.r.readexactly(length)


def load(url: str, home: str, spec_file: str, clients: int, duration: float,
         download_every: int) -> dict[str, Any]:
    """Run the load for ``duration`` seconds; what it measured (JSON-able)."""
    from cryptography.hazmat.primitives import serialization

    from fleet.core.pull import API_PREFIX, sign_report
    from fleet.server import auth

    spec = json.loads(Path(spec_file).read_text())
    secret = auth.load_secret(Path(home) / "keys" / "server_secret")
    now = int(time.time())
    devs = spec["devices"]
    tokens = [auth.make_token(secret, d, fp, now, 3600) for d, fp in devs]
    keys = [serialization.load_pem_private_key(k.encode(), None) for k in spec["keys"]]
    host, port = url.split("//")[1].split(":")
    ctx = ssl.create_default_context(cafile=str(Path(home) / "tls" / "ca.pem"))
    lat: list[float] = []
    errs: dict[str, int] = {}
    ops = {"downloads": 0, "reports": 0}
    body = json.dumps({"installed": {"bench": {"active": 1, "previous": None,
                                               "versions": [1]}},
                       "disk_free": 10 ** 9, "agent_version": "bench",
                       "root_version": 1}).encode()
    pkg = f"{API_PREFIX}/packages/{spec['sha']}"

    async def download(c: Conn, i: int) -> None:
        h = {"Authorization": f"Bearer {tokens[i]}"}
        half = PKG_BYTES // 2
        for rng in (f"bytes=0-{half - 1}", f"bytes={half}-"):
            st, data = await c.request("GET", pkg, {**h, "Range": rng})
            if st != 206 or len(data) != half:
                errs[f"range {st}"] = errs.get(f"range {st}", 0) + 1
                return
        ops["downloads"] += 1
        rep = json.dumps(sign_report(keys[i], {"deployment": None, "report": {  # type: ignore[arg-type]
            "name": "bench", "version": 1, "previous": None}})).encode()
        st, _ = await c.request("POST", f"{API_PREFIX}/reports", h, rep)
        if st == 200:
            ops["reports"] += 1
        else:
            errs[f"report {st}"] = errs.get(f"report {st}", 0) + 1

    async def client(seed: int, until: float) -> None:
        rnd = random.Random(seed)
        c = Conn(host, int(port), ctx)
        k = 0
        while time.monotonic() < until:
            k += 1
            if download_every and k % download_every == 0:
                await download(c, rnd.randrange(len(keys)))
                continue
            i = rnd.randrange(len(devs))
            t0 = time.perf_counter()
            st, _ = await c.request("POST", f"{API_PREFIX}/checkin",
                                    {"Authorization": f"Bearer {tokens[i]}"}, body)
            dt = time.perf_counter() - t0
            if st == 200:
                lat.append(dt)
            else:
                errs[str(st)] = errs.get(str(st), 0) + 1
        if c.w is not None:
            c.w.close()

    async def main() -> float:
        warm = time.monotonic() + 2.0  # connections, worker caches
        await asyncio.gather(*(client(-s - 1, warm) for s in range(clients)))
        lat.clear()
        errs.clear()
        ops.update(downloads=0, reports=0)
        t0 = time.monotonic()
        await asyncio.gather(*(client(s, t0 + duration) for s in range(clients)))
        return time.monotonic() - t0

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    wall = asyncio.run(main())
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    lat.sort()
    pick = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)) \
        if lat else (lambda q: float("nan"))
    return {"checkins": len(lat), "per_s": round(len(lat) / wall, 1),
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "errors": errs, **ops,
            "wall_s": round(wall, 2), "loadgen_cpu": round(
                (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / (wall + 2.0), 2)}


# -- one run --------------------------------------------------------------------------------
def _tree_cpu(pid: int) -> float:
    """CPU seconds (user+system) of ``pid`` and its live descendants."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(f[11]) + int(f[12])) / tick
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo += [int(k) for k in kids]
    return total


def _postmaster(cluster: Any) -> int | None:
    try:
        return int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def run(n: int, backend: str, workers: int, clients: int, duration: float,
        download_every: int, cluster: Any) -> dict[str, Any]:
    from fleet.registry.db import migrate

    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "FLEET_HOME": str(home), "FLEET_SERVER_RATE_PER_MIN": "1e9",
               "FLEET_SERVER_RATE_BURST": "1e9", "NO_COLOR": "1"}
        env.pop("FLEET_DB", None)
        db = None
        if backend == "postgresql":
            name = f"bench{n}_{workers}_{os.getpid()}"
            cluster.drop_database(name)
            db = cluster.create_database(name)
            migrate(db)
            env["FLEET_DB"] = db
        _fleet(env, "init")
        _fleet(env, "keys", "init")
        _fleet(env, "server", "init-tls")
        spec = Path(tmp) / "spec.json"
        t0 = time.monotonic()
        populate(home, db, n, spec)
        fill_s = time.monotonic() - t0
        port = _port()
        srv = subprocess.Popen([str(BIN / "fleet"), "server", "--listen", f"127.0.0.1:{port}",
                                "--workers", str(workers)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
        try:
            url = f"https://127.0.0.1:{port}"
            _wait_up(url, home / "tls" / "ca.pem", srv)
            pg_pid = _postmaster(cluster) if db is not None else None
            cpu0, w0 = _tree_cpu(srv.pid), time.monotonic()
            pg0 = _tree_cpu(pg_pid) if pg_pid else 0.0
            out = subprocess.run([sys.executable, __file__, "--load", url, str(home),
                                  str(spec), str(clients), str(duration),
                                  str(download_every)], env=env, capture_output=True,
                                 text=True, check=False)
            cpu1, w1 = _tree_cpu(srv.pid), time.monotonic()
            pg1 = _tree_cpu(pg_pid) if pg_pid else 0.0
            if out.returncode != 0:
                raise SystemExit(f"load generator failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout)
            res["postgres_cpu"] = round((pg1 - pg0) / (w1 - w0), 2) if pg_pid else None
            res["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on the machine
            return {"devices": n, "backend": backend, "workers": workers,
                    "clients": clients, "fill_s": round(fill_s, 1), **res,
                    "server_cpu": round((cpu1 - cpu0) / (w1 - w0), 2)}
        finally:
            os.killpg(srv.pid, signal.SIGTERM)
            srv.wait(30)
            if db is not None:
                cluster.drop_database(f"bench{n}_{workers}_{os.getpid()}")


def _wait_up(url: str, ca: Path, srv: subprocess.Popen[bytes]) -> None:
    import httpx

    tls = ssl.create_default_context(cafile=str(ca))
    for _ in range(600):
        if srv.poll() is not None:
            err = srv.stderr.read().decode() if srv.stderr else ""
            raise SystemExit(f"fleet server exited: {err[-2000:]}")
        try:
            httpx.get(url + "/healthz", verify=tls, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("fleet server did not come up")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        url, home, spec, clients, dur, every = sys.argv[2:8]
        print(json.dumps(load(url, home, spec, int(clients), float(dur), int(every))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="1000,10000,100000")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--download-every", type=int, default=100,
                   help="one request in N is a Range download + signed report (0: none)")
    p.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    p.add_argument("--compare", action="store_true",
                   help="also run the largest size with 1 worker and on SQLite")
    a = p.parse_args()
    from fleet.lab import pg

    sizes = [int(n) for n in a.devices.split(",")]
    plan = [(n, a.backend, a.workers) for n in sizes]
    if a.compare:
        plan += [(sizes[-1], a.backend, 1),
                 (sizes[-1], "sqlite" if a.backend == "postgresql" else "postgresql",
                  a.workers)]
    cluster = None
    if any(b == "postgresql" for _, b, _ in plan):
        cluster = pg.create(pg.private_root(None, prefix="fleet-pg-bench-"))
        pg.start(cluster, database=None)
    rows = []
    try:
        for n, backend, workers in plan:
            rows.append(run(n, backend, workers, a.clients, a.duration, a.download_every,
                            cluster))
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        if cluster is not None:
            pg.destroy(cluster)
    cpus = os.cpu_count()
    print(f"{'devices':>8} {'backend':>10} {'workers':>7} {'check-ins/s':>11} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'server CPU':>10} {'pg CPU':>6} "
          f"{'loadgen CPU':>11} {'load':>5}")
    for r in rows:
        print(f"{r['devices']:>8} {r['backend']:>10} {r['workers']:>7} {r['per_s']:>11} "
              f"{r['p50_ms']:>7} {r['p99_ms']:>7} {sum(r['errors'].values()):>6} "
              f"{r['server_cpu']:>10} {r['postgres_cpu'] or '-':>6} {r['loadgen_cpu']:>11} "
              f"{r['load_avg_1m']:>5}")
    print(f"target: >= 1000 check-ins/s, p99 < 100 ms at 100k devices; {cpus} CPUs shared "
          "by server, PostgreSQL and the load generator (CPU columns: CPU-seconds per s)")
    out = ROOT / "bench" / "results" / "server.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": platform.processor() or platform.machine(), "cpus": cpus,
        "clients": a.clients, "duration_s": a.duration,
        "download_every": a.download_every, "tls": True, "keep_alive": True,
        "target": {"checkins_per_s": 1000, "p99_ms": 100, "devices": 100000},
        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
