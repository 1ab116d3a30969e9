"""Dispatch and completion of 10,000 device tasks through Celery to two farm workers,
beside the in-process fan-out and the ceilings of Celery and of the registry, in one run.

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

Modes (same devices, same registry, same broker and workers):

1. ``in-process deploy``: ``run_deployment``'s fan-out in the controller's thread pool
   (16 threads), no farm hosts: the alternative to the farm;
2. ``celery trivial``: a bare Celery task (returns a constant, touches nothing) sent to
   the two hosts' queues and its result read back as the dispatcher reads results (one
   ``MGET`` per 500): the ceiling of Celery + Redis on this machine;
3. ``celery no-op``: the fleet's farm task with a handler that does nothing (the
   worker's own part: the device's row read, the cancel watch, a fan-out of one, the
   outcome document): the ceiling of a farm task before any deploy work;
4. ``celery deploy``: ``run_deployment`` with the Celery dispatcher: each worker runs
   the device's real step (its writes through ``fleet.rollout.steplog``: four
   transactions a fresh step), the controller follows the tasks until the last;
5. ``registry: deploy steps``: the registry writes of ``--registry-n`` fresh device
   steps alone (``StepLog``, 16 threads, no agent, no Celery): the ceiling the registry
   puts on real steps;
6. ``registry: 1 tx/event``: step events written one transaction each
   (``history.set_step``, 16 threads) -- the per-event cost before batching;
7. ``registry: batched``: step events written 500 a transaction
   (``history.record_steps``): the registry's raw write rate.

Reported: seconds, device tasks (or events) per second, registry rows written per second
(step events and reports) and the rate against the target. Target (issue 16): at least
1,000 device tasks per second dispatched and recorded. Prints a table and writes
``bench/results/dispatch.json``.
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


TRIVIAL = "bench.trivial"


def _trivial_task(app: Any) -> None:
    @app.task(name=TRIVIAL, acks_late=True)
    def trivial() -> int:
        return 1


def worker_main(home: Path, host: str, concurrency: int) -> int:
    from fleet.worker.runner import run_worker

    fleet = LazyFleet()
    return run_worker(FleetHome(home), host, concurrency=concurrency, opener=fleet.opener,
                      handlers={"bench.noop": Handler(_noop, lambda r: r)},
                      setup=_trivial_task)


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


def _row(n: int, seconds: float, rows: int = 0, *, send_s: float | None = None,
         create_s: float = 0.0, ok: int | None = None, unit: str = "tasks") -> dict[str, Any]:
    done = n if ok is None else ok
    return {"devices": n, "ok": done, "unit": unit, "create_s": create_s, "send_s": send_s,
            "complete_s": seconds, "tasks_per_s": done / seconds, "rows_written": rows,
            "rows_per_s": rows / seconds}


def _trivials(n: int, dispatcher: Any) -> dict[str, Any]:
    """``n`` bare Celery tasks over the two queues, results read as the dispatcher reads
    them (``CeleryBroker.states``: one MGET per 500 pending)."""
    from fleet.worker.settings import queue_for

    app = dispatcher.broker.app
    ids = [uuid.uuid4().hex for _ in range(n)]
    t0 = time.perf_counter()
    with app.producer_or_acquire() as producer:
        for i, tid in enumerate(ids):
            app.send_task(TRIVIAL, task_id=tid, queue=queue_for("ab"[i % 2]),
                          producer=producer)
    t1 = time.perf_counter()
    pending = set(ids)
    while pending:
        done = {tid for tid, st in dispatcher.broker.states(sorted(pending)).items()
                if st.state == "SUCCESS"}
        pending -= done
        if pending:
            time.sleep(0.05)
    return _row(n, time.perf_counter() - t0, send_s=t1 - t0)


def _threads(items: list[Any], fn: Any, workers: int = 16) -> float:
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, items))
    return time.perf_counter() - t0


def _fresh_steps(reg: Registry, devices: list[Device], tag: str) -> tuple[uuid.UUID, list[Any]]:
    dep, steps = hist.create_deployment(reg, name=f"bench-{tag}", version=1, target="bench",
                                        devices=devices, artifact_id=None, lease=None,
                                        options={})
    return dep.id, [(steps[d.name].id, d) for d in devices]


def _registry_steps(reg: Registry, devices: list[Device]) -> dict[str, Any]:
    """The registry writes of a fresh deploy step (what ``_Device.run`` keeps in its
    StepLog and when it flushes), with no agent: the registry's ceiling on real steps."""
    from fleet.registry.models import StepState
    from fleet.rollout.steplog import StepLog

    dep_id, steps = _fresh_steps(reg, devices, "steps")
    body = {"name": "m", "version": 1, "digest": "digest-m-1", "pick": {"backend": "cpu"}}
    status = {"installed": {}, "disk": {"free": 2**34}}

    def step(item: Any) -> None:
        step_id, dev = item
        log = StepLog(reg, step_id, dev)
        log.attempt(1, StepState.PENDING)
        log.contact(agent_version="bench")
        log.status_facts(status)
        log.move(StepState.PUSHING, remote="/x")
        log.flush()
        log.move(StepState.PUSHED, bytes_sent=1, resumed_from=0, sha256="0" * 64)
        log.move(StepState.STAGED, version=1)
        log.flush()
        log.move(StepState.ACTIVATING)
        log.flush()
        log.activation(body, deployment_id=dep_id, bytes_sent=1)
        log.contact(status="ok")
        log.flush()

    seconds = _threads(steps, step)
    return _row(len(steps), seconds, _rows_written(reg, dep_id) - len(steps))


def _registry_events(reg: Registry, devices: list[Device], *, batched: bool
                     ) -> dict[str, Any]:
    """One event per step: one transaction each (``set_step``, 16 threads) or 500 to a
    transaction (``record_steps``)."""
    from fleet.registry.models import StepState

    dep_id, steps = _fresh_steps(reg, devices, "batched" if batched else "events")
    if batched:
        changes = [hist.StepChange(sid, StepState.PUSHING, {"remote": "/x"})
                   for sid, _ in steps]
        t0 = time.perf_counter()
        for i in range(0, len(changes), 500):
            hist.record_steps(reg, changes[i:i + 500])
        seconds = time.perf_counter() - t0
    else:
        seconds = _threads(steps, lambda item: hist.set_step(reg, item[0], StepState.PUSHING,
                                                             remote="/x"))
    return _row(len(steps), seconds, _rows_written(reg, dep_id) - len(steps), unit="events")


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


def run(n: int, backend: str, concurrency: int, registry_n: int) -> dict[str, Any]:
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
        few = devices[:registry_n]
        rows["in-process deploy"] = _deploy(home, reg, job, devices, dispatcher=None,
                                            opener=LazyFleet().opener)
        rows["celery trivial"] = _trivials(n, disp)
        rows["celery no-op"] = _noops(reg, devices, disp)
        rows["celery deploy"] = _deploy(home, reg, job, devices,
                                        dispatcher=dispatcher_for(home, reg), opener=None)
        rows["registry: deploy steps"] = _registry_steps(reg, few)
        rows["registry: 1 tx/event"] = _registry_events(reg, few, batched=False)
        rows["registry: batched"] = _registry_events(reg, devices, batched=True)
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
    ap.add_argument("--registry-n", type=int, default=2000,
                    help="device steps for the registry-only modes")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "dispatch.json")
    args = ap.parse_args()
    if args.cmd == "worker":
        return worker_main(args.home, args.host, args.concurrency)
    rows = run(args.devices, args.backend, args.concurrency, args.registry_n)
    print(f"{args.devices} device tasks ({args.registry_n} for the registry-only steps and "
          f"1 tx/event), registry on {args.backend}, 2 workers x {args.concurrency} "
          f"threads, {os.cpu_count()} CPU(s)")
    print(f"{'mode':24} {'n':>6} {'send s':>7} {'total s':>8} {'per s':>8} {'unit':>7} "
          f"{'rows/s':>7} {'of target':>9}")
    for mode, r in rows.items():
        send = f"{r['send_s']:.2f}" if r["send_s"] is not None else "-"
        unit = r.get("unit", "tasks")
        share = f"{r['tasks_per_s'] / TARGET:.0%}" if unit == "tasks" else "-"
        print(f"{mode:24} {r['devices']:6d} {send:>7} {r['complete_s']:8.2f} "
              f"{r['tasks_per_s']:8.0f} {unit:>7} {r['rows_per_s']:7.0f} {share:>9}")
        assert r["ok"] == r["devices"], (mode, r)
    met = rows["celery deploy"]["tasks_per_s"] >= TARGET
    print(f"target >= {TARGET:.0f} device tasks/s dispatched and recorded: "
          f"{'met' if met else 'NOT met'}")
    out = {"devices": args.devices, "registry_n": args.registry_n, "backend": args.backend,
           "threads_per_worker": args.concurrency, "cpus": os.cpu_count(),
           "machine": platform.machine(), "python": platform.python_version(),
           "target_tasks_per_s": TARGET, "target_met": met, "modes": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
