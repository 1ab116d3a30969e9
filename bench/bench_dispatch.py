"""Dispatch and completion of 10,000 device tasks through Celery to two farm workers,
beside the in-process fan-out, in one run.

    .venv/bin/python bench/bench_dispatch.py [--devices 10000] [--backend postgresql]
    make bench-dispatch

Real parts: a private Redis (``fleet.lab.redis``, Unix socket) as broker and result
backend, the registry on a private PostgreSQL cluster (``fleet.lab.pg``, durable: fsync
on) or SQLite, two ``fleet worker`` processes (``fleet.worker.runner.run_worker``, hosts
``a`` and ``b``, a pool of threads each) and the controller's real deploy path
(``fleet.rollout.deploy``: a deployment row, one step per device, every state change an
event). The transport is fake and fast: each device is an in-memory ``FakeAgent``
(``tests/fakes.py``) that answers ``status``, takes the push, stages and activates at
once (no MNN), so what is measured is dispatch, the workers and the registry.

Modes, same devices, same registry:

1. ``celery deploy``: ``run_deployment`` with the Celery dispatcher: 10k tasks sent to
   the two hosts' queues, each worker runs the device's step (about ten registry
   transactions: attempt, status, push, pushed, staged, activating, activation with its
   report, device contact), the controller follows the task states until the last;
2. ``celery no-op``: the same number of tasks that only read their device (the ceiling
   of Celery on this machine, without the deploy's registry writes);
3. ``in-process deploy``: ``run_deployment`` in the controller's thread pool (16
   threads), the fan-out without farm hosts.

Reported: seconds to send, to complete, device tasks per second (completed and recorded),
registry rows written per second (step events, reports) and the ratio to the in-process
fan-out. Target (issue 16): at least 1,000 device tasks per second dispatched and
recorded. Prints a table and writes ``bench/results/dispatch.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from fleet import config  # noqa: E402
from fleet.agent_client import AgentClient  # noqa: E402
from fleet.home import FleetHome  # noqa: E402
from fleet.registry import Device, Registry  # noqa: E402
from fleet.registry import history as hist  # noqa: E402
from fleet.registry.models import Report, StepEvent  # noqa: E402
from fleet.rollout.deploy import DeployJob, Run  # noqa: E402
from fleet.rollout.fanout import Remote, TaskContext, call_each  # noqa: E402
from fleet.rollout.lease import holder  # noqa: E402
from fleet.worker.tasks import Handler, Job  # noqa: E402
from tests.fakes import FakeAgent, FakeTransport, fake_package  # noqa: E402

TARGET = 1000.0


class LazyFleet:
    """Fake agents made on first use (a worker sees only its own devices)."""

    def __init__(self) -> None:
        self.agents: dict[str, FakeAgent] = {}
        self.lock = threading.Lock()

    @contextmanager
    def opener(self, device: Device, ctx: Any = None) -> Iterator[AgentClient]:
        with self.lock:
            agent = self.agents.setdefault(device.name, FakeAgent(device.name))
        transport = FakeTransport(agent)
        if ctx is not None:
            ctx.add_closer(transport.close)
        with transport:
            yield AgentClient(transport, device)


def _noop(job: Job) -> Any:
    return lambda dev, ctx: {"device": dev.name}


def worker_main(home: Path, host: str, concurrency: int) -> int:
    from fleet.worker.runner import run_worker

    fleet = LazyFleet()
    return run_worker(FleetHome(home), host, concurrency=concurrency, opener=fleet.opener,
                      handlers={"bench.noop": Handler(_noop, lambda r: r)})


def _registry_url(root: Path, backend: str) -> tuple[str, Any]:
    if backend == "sqlite":
        return f"sqlite:///{root / 'registry.db'}", None
    from fleet.lab import pg

    cluster = pg.create(pg.private_root(root / "pg", prefix="fleet-bench-pg-"))
    pg.start(cluster)
    return cluster.url(), cluster


def _devices(reg: Registry, n: int) -> list[Device]:
    with reg.session() as s:
        s.add_all([Device(name=f"d{i:05d}", uri=f"local://d{i:05d}?root=/x",
                          platform="linux", via="ab"[i % 2]) for i in range(n)])
    return reg.list_devices()


def _rows_written(reg: Registry, dep_id: uuid.UUID) -> int:
    from sqlalchemy import func
    from sqlmodel import col, select

    from fleet.registry.models import DeploymentStep

    with reg.reading() as s:
        events = s.exec(select(func.count()).select_from(StepEvent)
                        .join(DeploymentStep, col(DeploymentStep.id) == col(StepEvent.step_id))
                        .where(DeploymentStep.deployment_id == dep_id)).one()
        reports = s.exec(select(func.count()).select_from(Report)
                         .where(Report.deployment_id == dep_id)).one()
    return int(events) + int(reports)


def _deploy(home: FleetHome, reg: Registry, job: DeployJob, devices: list[Device], *,
            dispatcher: Any, opener: Any) -> dict[str, Any]:
    who = holder()
    t0 = time.perf_counter()
    dep, _ = hist.create_deployment(reg, name=job.name, version=job.version, target="bench",
                                    devices=devices, artifact_id=None, lease=who,
                                    options={"job": job.to_options()})
    t_created = time.perf_counter()
    before = _rows_written(reg, dep.id)
    sent: dict[str, float] = {}
    if dispatcher is not None:
        send = dispatcher.broker.send

        def timed_send(batch: Any) -> None:
            s0 = time.perf_counter()
            send(batch)
            sent["s"] = sent.get("s", 0.0) + time.perf_counter() - s0

        dispatcher.broker.send = timed_send
    run = Run(home, reg, dep.id, job, {d.name: d for d in devices}, threading.Event(),
              opener, {"workers": 16, "deadline_s": 60.0, "retries": 0}, holder=who,
              dispatcher=dispatcher)
    t1 = time.perf_counter()
    result = run.run_devices([d.name for d in devices])
    t2 = time.perf_counter()
    hist.finish_deployment(reg, dep.id, lease=who)
    written = _rows_written(reg, dep.id) - before
    ok = sum(1 for o in result if o.ok)
    return {"devices": len(devices), "ok": ok, "create_s": t_created - t0,
            "send_s": sent.get("s"), "complete_s": t2 - t1,
            "tasks_per_s": ok / (t2 - t1), "rows_written": written,
            "rows_per_s": written / (t2 - t1)}


def _noops(reg: Registry, devices: list[Device], dispatcher: Any) -> dict[str, Any]:
    sent: dict[str, float] = {}
    send = dispatcher.broker.send

    def timed_send(batch: Any) -> None:
        s0 = time.perf_counter()
        send(batch)
        sent["s"] = time.perf_counter() - s0

    dispatcher.broker.send = timed_send

    def unused(dev: Device, ctx: TaskContext) -> None:
        raise AssertionError("every device has a farm host")

    t1 = time.perf_counter()
    result = call_each(devices, unused, deadline_s=60.0, retries=0,
                       remote=Remote("bench.noop"), dispatcher=dispatcher)
    t2 = time.perf_counter()
    ok = sum(1 for o in result if o.ok)
    return {"devices": len(devices), "ok": ok, "create_s": 0.0, "send_s": sent.get("s"),
            "complete_s": t2 - t1, "tasks_per_s": ok / (t2 - t1), "rows_written": 0,
            "rows_per_s": 0.0}


def _start_workers(root: Path, home: FleetHome, concurrency: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    env = {k: v for k, v in os.environ.items() if k not in ("FLEET_DB", "FLEET_BROKER")}
    for host in ("a", "b"):
        log = open(root / f"worker-{host}.log", "ab")  # noqa: SIM115 - the child's
        with log:
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "worker", "--home",
                 str(home.path), "--host", host, "--concurrency", str(concurrency)],
                env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL))
    return procs


def _wait_live(reg: Registry, hosts: set[str]) -> None:
    from fleet.worker import roster

    end = time.monotonic() + 120
    while set(roster.host_liveness(reg, stale_s=20.0)) < hosts:
        if time.monotonic() > end:
            raise SystemExit("the bench workers did not come up (see worker-*.log)")
        time.sleep(0.2)


def run(n: int, backend: str, concurrency: int) -> dict[str, Any]:
    from fleet.lab import redis as lab_redis
    from fleet.worker.dispatch import dispatcher_for

    root = Path(tempfile.mkdtemp(prefix="fleet-bench-dispatch-"))
    cluster = None
    srv = lab_redis.start(root / "redis")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        url, cluster = _registry_url(root, backend)
        home = FleetHome(root / "home")
        home.ensure()
        config.update(home.path, {"registry.url": url, "broker.url": srv.url,
                                  "broker.deadline_s": 60.0})
        reg = Registry.init(home)
        devices = _devices(reg, n)
        path, sha = fake_package(home.artifacts_dir, "m", 1)
        job = DeployJob(name="m", version=1, kind="model", package=path, package_sha256=sha,
                        digest="digest-m-1", size=path.stat().st_size, bench={})
        procs = _start_workers(root, home, concurrency)
        _wait_live(reg, {"a", "b"})
        rows: dict[str, Any] = {}
        disp = dispatcher_for(home, reg)
        assert disp is not None
        rows["celery no-op"] = _noops(reg, devices, disp)
        rows["celery deploy"] = _deploy(home, reg, job, devices,
                                        dispatcher=dispatcher_for(home, reg), opener=None)
        rows["in-process deploy"] = _deploy(home, reg, job, devices, dispatcher=None,
                                            opener=LazyFleet().opener)
        return rows
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
        lab_redis.stop(srv.root)
        if cluster is not None:
            from fleet.lab import pg

            pg.destroy(cluster)
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("worker")
    w.add_argument("--home", type=Path, required=True)
    w.add_argument("--host", required=True)
    w.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    ap.add_argument("--concurrency", type=int, default=8, help="threads per worker")
    args = ap.parse_args()
    if args.cmd == "worker":
        return worker_main(args.home, args.host, args.concurrency)
    rows = run(args.devices, args.backend, args.concurrency)
    base = rows["in-process deploy"]["tasks_per_s"]
    print(f"{args.devices} device tasks, registry on {args.backend}, 2 workers x "
          f"{args.concurrency} threads, {os.cpu_count()} CPU(s)")
    print(f"{'mode':20} {'create s':>9} {'send s':>8} {'complete s':>11} {'tasks/s':>9} "
          f"{'rows/s':>9} {'x in-process':>13}")
    for mode, r in rows.items():
        send = f"{r['send_s']:.2f}" if r["send_s"] is not None else "-"
        print(f"{mode:20} {r['create_s']:9.2f} {send:>8} {r['complete_s']:11.2f} "
              f"{r['tasks_per_s']:9.0f} {r['rows_per_s']:9.0f} "
              f"{r['tasks_per_s'] / base:13.2f}")
        assert r["ok"] == r["devices"], (mode, r)
    met = rows["celery deploy"]["tasks_per_s"] >= TARGET
    print(f"target >= {TARGET:.0f} device tasks/s dispatched and recorded: "
          f"{'met' if met else 'NOT met'}")
    out = {"devices": args.devices, "backend": args.backend, "threads_per_worker":
           args.concurrency, "cpus": os.cpu_count(), "machine": platform.machine(),
           "python": platform.python_version(), "target_tasks_per_s": TARGET,
           "target_met": met, "modes": rows}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "dispatch.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
