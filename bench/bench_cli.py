"""CLI start-up time: ``fleet --help`` and ``fleet device list`` against ``python -c pass``.

    .venv/bin/python bench/bench_cli.py [--runs 10] [--devices 100]

Each command runs ``--runs`` times as a fresh process (what an operator's shell does); the
table shows the median and the minimum wall time, and each median's ratio to the
interpreter's own start (``python -c pass``) and to the target (0.3 s). The registry gets
``--devices`` local devices in one group first (inserted through the registry API, no agent
needed: start-up and listing are what is measured, not enrolment). One warm-up run per
command is discarded (the page cache, not the code, is what it would measure). Prints a
table and writes ``bench/results/cli.json``.
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
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TARGET_S = 0.3


def _fill(home: Path, n: int) -> None:
    from fleet.home import FleetHome
    from fleet.registry import Registry
    from fleet.registry.models import Device

    reg = Registry.init(FleetHome(home))
    reg.create_group("bench")
    with reg.session() as s:
        for i in range(n):
            s.add(Device(name=f"dev{i:04d}", platform="linux", uri=f"local:///tmp/bench/{i}",
                         status="ok", tags={"site": "bench"}))
    reg.add_to_group("bench", [f"dev{i:04d}" for i in range(n)])


def _time(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    subprocess.run(argv, env=env, capture_output=True, check=True)  # warm-up, discarded
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--devices", type=int, default=100)
    args = ap.parse_args()
    fleet = str(Path(sys.executable).with_name("fleet"))
    with tempfile.TemporaryDirectory(prefix="fleet-bench-cli-") as tmp:
        home = Path(tmp) / "home"
        env = {**os.environ, "FLEET_HOME": str(home), "NO_COLOR": "1"}
        env.pop("FLEET_DB", None)
        _fill(home, args.devices)
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "fleet --help": [fleet, "--help"],
            f"fleet device list ({args.devices})": [fleet, "device", "list"],
            f"fleet device list --json ({args.devices})": [fleet, "device", "list", "--json"],
        }
        rows: list[dict[str, Any]] = []
        for label, argv in cases.items():
            times = _time(argv, env, args.runs)
            rows.append({"command": label, "median_s": statistics.median(times),
                         "min_s": min(times), "runs": args.runs})
    base = rows[0]["median_s"]
    print(f"{'command':<34} {'median s':>9} {'min s':>7} {'x python':>9} {'x target':>9}")
    for r in rows:
        r["ratio_python"] = r["median_s"] / base
        r["ratio_target"] = r["median_s"] / TARGET_S
        print(f"{r['command']:<34} {r['median_s']:>9.3f} {r['min_s']:>7.3f} "
              f"{r['ratio_python']:>9.1f} {r['ratio_target']:>9.2f}")
    out = HERE / "results" / "cli.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.node(), "cpus": os.cpu_count(),
                               "load": os.getloadavg(), "target_s": TARGET_S, "rows": rows},
                              indent=2) + "\n")
    print(f"load average {os.getloadavg()[0]:.1f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
