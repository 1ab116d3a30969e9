"""The registry at fleet scale: N devices on SQLite and on PostgreSQL, timed where the
operator feels them.

    .venv/bin/python bench/bench_registry.py [--sizes 10000,100000]
        [--backends sqlite,postgresql] [--runs 3] [--events 100000]

For each backend and size, a fresh registry (an SQLite file; a database in a private,
durable PostgreSQL cluster: fsync on, as a server runs, started by fleet.lab.pg) is filled
by bench/registry_fill.py (groups ``big`` and ``site-K``, tags, a capability snapshot, an
activation report and selector facts per device), then:

- each command as a fresh ``fleet`` process, as an operator runs it (import time counts;
  output to /dev/null), the median of ``--runs`` and the peak RSS:
  ``device list -g big --ndjson``, ``status``, ``group show big``, the selector
  ``device list -l hw.arch=aarch64 --ndjson`` (30 % of the fleet), and ``status`` on an
  empty registry: the start-up every command pays, for reference; beside them, once, the
  obvious alternative to streaming: ``device list -g big --json`` (ORM objects, the whole
  list in memory, one JSON document);
- in the process: planning a deploy to ``-g big`` (the targets through the selector code,
  then the dry run's per-device decisions, :func:`fleet.rollout.plan.plan_deploy`, from the
  facts each device last reported: no package, no transfer), creating that deployment
  (one step and one event per device), and recording step events: ``--events`` through
  :func:`fleet.registry.history.record_steps` in batches of 500 (what a farm worker or a
  dispatcher writes), and a fiftieth as many through
  :func:`~fleet.registry.history.set_step`,
  one transaction each, from 8 threads (the in-process fan-out's way).

Prints a table per backend with the growth from the smallest to the largest size (ratio of
times against ratio of sizes: 10.0 at 10k -> 100k is linear) and the targets (issue 16:
every listed command < 2 s at 100k, planning < 5 s, step events >= 5,000/s on PostgreSQL,
growth linear or better); writes ``bench/results/registry.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

COMMANDS = {
    "start-up (empty registry)": ["status"],
    "device list -g big --ndjson": ["device", "list", "-g", "big", "--ndjson"],
    "status": ["status"],
    "group show big": ["group", "show", "big"],
    "device list -l hw.arch=aarch64 --ndjson": ["device", "list", "-l", "hw.arch=aarch64",
                                                "--ndjson"],
}
#: the obvious alternative to the streamed listing, timed once: ORM rows, the whole list
#: built in memory, then written as one JSON document
ALTERNATIVE = {"device list -g big --json (ORM)":
               ["device", "list", "-g", "big", "--json"]}
LISTED_TARGET_S = 2.0
PLAN_TARGET_S = 5.0
EVENTS_TARGET = 5000.0
BATCH = 500
THREADS = 8


#: runs one command and writes "wall_s peak_rss_kib" to argv[1]: a small parent, since a
#: child forked from this (large) process would report this process's high-water mark as
#: its own (Linux carries it across fork and exec)
_LAUNCHER = ("import resource, subprocess, sys, time\n"
             "t0 = time.perf_counter()\n"
             "rc = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL).returncode\n"
             "wall = time.perf_counter() - t0\n"
             "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
             "open(sys.argv[1], 'w').write(f'{wall} {rss}')\n"
             "sys.exit(rc)\n")


def _fleet(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    """One fresh ``fleet`` process, output to /dev/null: (wall seconds, peak RSS in KiB)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as out:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, out.name, sys.executable,
                               "-m", "fleet", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env, cwd=REPO, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"fleet {' '.join(args)} failed: {proc.stderr.decode()[-500:]}")
        wall, rss = out.read().split()
        return float(wall), int(rss)


def _time_cli(args: list[str], env: dict[str, str], runs: int) -> dict[str, Any]:
    _fleet(args, env)  # warm-up (page cache), discarded
    samples = [_fleet(args, env) for _ in range(runs)]
    return {"median_s": statistics.median(s for s, _ in samples),
            "min_s": min(s for s, _ in samples),
            "peak_rss_mib": max(r for _, r in samples) / 1024}


def _env(home: Path, url: str) -> dict[str, str]:
    return {"FLEET_HOME": str(home), "FLEET_DB": url, "NO_COLOR": "1", "COLUMNS": "200",
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": f"{REPO / 'agents'}:{REPO}"}


def _fill(url: str, n: int) -> float:
    from registry_fill import fill

    from fleet.registry.db import make_engine, migrate

    t0 = time.perf_counter()
    migrate(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        fill(conn, n)
    engine.dispose()
    return time.perf_counter() - t0


def _plan(reg: Any) -> dict[str, Any]:
    from fleet.registry.selectors import select_devices
    from fleet.rollout.plan import plan_deploy

    t0 = time.perf_counter()
    devices = select_devices(reg, groups=["big"])
    t1 = time.perf_counter()
    plan = plan_deploy(devices, name="tiny", version=2, digest="cd" * 32, size=4 << 20)
    t2 = time.perf_counter()
    sends = sum(1 for d in plan.devices if d.action == "send")
    return {"seconds": t2 - t0, "targets_s": t1 - t0, "decide_s": t2 - t1,
            "devices": len(devices), "send": sends}


def _events(reg: Any, n_events: int) -> dict[str, Any]:
    """Create a deployment over ``-g big``, then record step events two ways."""
    from fleet.registry import history as hist
    from fleet.registry.models import StepState
    from fleet.registry.selectors import select_devices

    devices = select_devices(reg, groups=["big"])
    t0 = time.perf_counter()
    _, steps = hist.create_deployment(reg, name="tiny", version=2, target="-g big",
                                      devices=devices, artifact_id=None)
    created = time.perf_counter() - t0
    ids = [st.id for st in steps.values()]
    states = [StepState.CONNECTING, StepState.PUSHING, StepState.PUSHED, StepState.STAGED,
              StepState.ACTIVATING, StepState.ACTIVATED, StepState.OK]
    changes = [hist.StepChange(ids[i % len(ids)], states[(i // len(ids)) % len(states)],
                               {"n": i}) for i in range(n_events)]
    t0 = time.perf_counter()
    for start in range(0, len(changes), BATCH):
        hist.record_steps(reg, changes[start:start + BATCH])
    batched = time.perf_counter() - t0

    single = max(n_events // 50, THREADS)
    per_thread = single // THREADS
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(per_thread):
                hist.set_step(reg, ids[(k * per_thread + i) % len(ids)], StepState.PUSHING,
                              n=i)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    one_by_one = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return {"create_deployment_s": created, "steps": len(ids),
            "batched_events": n_events, "batched_s": batched,
            "batched_per_s": n_events / batched,
            "single_events": per_thread * THREADS, "single_s": one_by_one,
            "single_per_s": per_thread * THREADS / one_by_one}


def _one(backend: str, url: str, home: Path, n: int, args: argparse.Namespace
         ) -> dict[str, Any]:
    from fleet.home import FleetHome
    from fleet.registry import Registry

    out: dict[str, Any] = {"backend": backend, "devices": n}
    print(f"[{backend} {n}] filling ...", file=sys.stderr, flush=True)
    out["fill_s"] = _fill(url, n)
    env = _env(home, url)
    out["commands"] = {}
    for label, argv in COMMANDS.items():
        if label.startswith("start-up"):
            continue
        print(f"[{backend} {n}] fleet {' '.join(argv)}", file=sys.stderr, flush=True)
        out["commands"][label] = _time_cli(argv, env, args.runs)
    out["alternatives"] = {}
    for label, argv in ALTERNATIVE.items():
        print(f"[{backend} {n}] fleet {' '.join(argv)} (alternative)", file=sys.stderr,
              flush=True)
        wall, rss = _fleet(argv, env)
        out["alternatives"][label] = {"seconds": wall, "peak_rss_mib": rss / 1024}
    reg = Registry.open(FleetHome(home, db_override=url))
    try:
        print(f"[{backend} {n}] planning, events ...", file=sys.stderr, flush=True)
        out["plan"] = _plan(reg)
        out["events"] = _events(reg, min(args.events, max(n, args.events)))
    finally:
        reg.close()
    return out


def _startup(backend: str, url: str, home: Path, runs: int) -> dict[str, Any]:
    from fleet.registry.db import migrate

    migrate(url)
    return _time_cli(COMMANDS["start-up (empty registry)"], _env(home, url), runs)


def _targets(results: list[dict[str, Any]], largest: int) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        if r["devices"] != largest:
            continue
        for label, c in r["commands"].items():
            rows.append({"backend": r["backend"], "what": label, "value": c["median_s"],
                         "target": f"< {LISTED_TARGET_S:g} s",
                         "met": c["median_s"] < LISTED_TARGET_S})
        rows.append({"backend": r["backend"], "what": "plan a deploy",
                     "value": r["plan"]["seconds"], "target": f"< {PLAN_TARGET_S:g} s",
                     "met": r["plan"]["seconds"] < PLAN_TARGET_S})
        if r["backend"] == "postgresql":
            best = max(r["events"]["batched_per_s"], r["events"]["single_per_s"])
            rows.append({"backend": r["backend"], "what": "step events /s", "value": best,
                         "target": f">= {EVENTS_TARGET:g}/s", "met": best >= EVENTS_TARGET})
    return rows


def _growth(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for backend in sorted({r["backend"] for r in results}):
        mine = sorted((r for r in results if r["backend"] == backend),
                      key=lambda r: r["devices"])
        if len(mine) < 2:
            continue
        lo, hi = mine[0], mine[-1]
        size_ratio = hi["devices"] / lo["devices"]
        pairs = [(k, lo["commands"][k]["median_s"], hi["commands"][k]["median_s"])
                 for k in lo["commands"]]
        pairs.append(("plan a deploy", lo["plan"]["seconds"], hi["plan"]["seconds"]))
        pairs.append(("create deployment", lo["events"]["create_deployment_s"],
                      hi["events"]["create_deployment_s"]))
        for what, a, b in pairs:
            rows.append({"backend": backend, "what": what, "small_s": a, "large_s": b,
                         "time_ratio": b / a, "size_ratio": size_ratio,
                         "linear_or_better": b / a <= size_ratio * 1.1})
    return rows


def _print(results: list[dict[str, Any]], startup: dict[str, Any],
           growth: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    for r in results:
        print(f"\n{r['backend']}, {r['devices']:,} devices (filled in {r['fill_s']:.0f} s)")
        s = startup[r["backend"]]
        print(f"  {'command':<42} {'median s':>9} {'min s':>7} {'- start-up':>10} "
              f"{'peak RSS MiB':>13}")
        for label, c in r["commands"].items():
            print(f"  {label:<42} {c['median_s']:>9.2f} {c['min_s']:>7.2f} "
                  f"{c['median_s'] - s['median_s']:>10.2f} {c['peak_rss_mib']:>13.0f}")
        for label, a in r.get("alternatives", {}).items():
            print(f"  {'vs ' + label:<42} {a['seconds']:>9.2f} {'':>7} "
                  f"{a['seconds'] - s['median_s']:>10.2f} {a['peak_rss_mib']:>13.0f}")
        print(f"  {'(start-up: status, empty registry)':<42} {s['median_s']:>9.2f} "
              f"{s['min_s']:>7.2f} {'':>10} {s['peak_rss_mib']:>13.0f}")
        p, e = r["plan"], r["events"]
        print(f"  plan a deploy -g big: {p['seconds']:.2f} s (targets {p['targets_s']:.2f} s, "
              f"decisions {p['decide_s']:.2f} s; {p['send']:,} of {p['devices']:,} to send)")
        print(f"  create the deployment ({e['steps']:,} steps + events): "
              f"{e['create_deployment_s']:.2f} s")
        print(f"  step events: {e['batched_per_s']:,.0f}/s batched ({e['batched_events']:,} "
              f"in batches of {BATCH}); {e['single_per_s']:,.0f}/s one per transaction "
              f"({e['single_events']:,} from {THREADS} threads)")
    if growth:
        print(f"\ngrowth, {growth[0]['size_ratio']:.0f}x the devices:")
        for g in growth:
            print(f"  {g['backend']:<11} {g['what']:<42} {g['small_s']:>7.2f} -> "
                  f"{g['large_s']:>6.2f} s  x{g['time_ratio']:.1f}  "
                  f"{'linear or better' if g['linear_or_better'] else 'WORSE than linear'}")
    print("\ntargets at the largest size:")
    for t in targets:
        val = f"{t['value']:,.0f}/s" if "/s" in t["what"] else f"{t['value']:.2f} s"
        print(f"  {t['backend']:<11} {t['what']:<42} {val:>10}  {t['target']:<10} "
              f"{'met' if t['met'] else 'NOT met'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--backends", default="sqlite,postgresql")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--events", type=int, default=100_000)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",")]
    results: list[dict[str, Any]] = []
    startup: dict[str, Any] = {}
    cluster = None
    with tempfile.TemporaryDirectory(prefix="fleet-bench-registry-") as tmp:
        try:
            if "postgresql" in backends:
                from fleet.lab import pg

                cluster = pg.start(pg.create(pg.private_root(None, prefix="fleet-bench-pg-"),
                                             durable=True), database=None)
            for backend in backends:
                def url_for(name: str, backend: str = backend) -> str:
                    if backend == "sqlite":
                        return f"sqlite:///{Path(tmp) / (name + '.db')}"
                    assert cluster is not None
                    return cluster.create_database(name)

                startup[backend] = _startup(backend, url_for("empty"), Path(tmp) / "h0",
                                            args.runs)
                for n in sizes:
                    home = Path(tmp) / f"h-{backend}-{n}"
                    results.append(_one(backend, url_for(f"r{n}"), home, n, args))
        finally:
            if cluster is not None:
                from fleet.lab import pg

                pg.destroy(cluster)
    growth = _growth(results)
    targets = _targets(results, max(sizes))
    _print(results, startup, growth, targets)
    doc = {"machine": platform.node(), "cpus": os.cpu_count(), "load": os.getloadavg(),
           "python": platform.python_version(), "startup": startup, "results": results,
           "growth": growth, "targets": targets}
    out = HERE / "results" / "registry.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
