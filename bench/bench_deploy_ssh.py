"""Deploy a 64 MiB model to 16 IoT lab boards over ssh, against parallel plain ``scp``.

    sudo .venv/bin/python bench/bench_deploy_ssh.py [--boards 16] [--mib 64]

Same run, same boards (real OpenSSH sshd in network namespaces, see ``fleet.lab.iot``):

1. ``scp`` of the plain model to every board, 16 at once (``xargs -P 16``): the baseline.
2. the fleet's ssh transport alone: ``SshTransport.push`` of the same file to every board
   from a 16-thread pool (resumable SFTP, sha256 verified on the board before rename).
3. ``fleet deploy`` end to end: package (sign, encrypt once, wrap the key for 16
   recipients), push, stage (the agent verifies signature and digest), activate (decrypt
   into memory, MNN load, probe, 1-iteration health check), report.
4. ``fleet deploy`` of the same version again: should send ~0 bytes.

Bytes on the wire are the veth counters of the boards (both directions, every header),
not what the programs say they sent. Prints a table and writes
``bench/results/deploy_ssh.json``. Needs root (the lab).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MIB = 1 << 20


def _fleet(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLEET_HOME=str(home), NO_COLOR="1")
    res = subprocess.run([str(Path(sys.prefix) / "bin" / "fleet"), *args], env=env,
                         capture_output=True, text=True, timeout=1800, check=False)
    if check and res.returncode != 0:
        raise SystemExit(f"fleet {' '.join(args)} failed ({res.returncode}):\n"
                         f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _make_model(path: Path, mib: int) -> None:
    """A MatMul with an fp32 weight of ``mib`` MiB: big on the wire, cheap to run."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = int((mib * MIB / 4) ** 0.5)
    w = np.random.default_rng(7).standard_normal((n, n)).astype(np.float32) * 0.01
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx_path = path.with_suffix(".onnx")
    onnx.save(model, str(onnx_path))
    from fleet.artifacts.convert import mnnconvert
    mnnconvert(["-f", "ONNX", "--modelFile", str(onnx_path), "--MNNModel", str(path),
                "--bizCode", "bench"])
    onnx_path.unlink()


def _wire_bytes(ifaces: list[str]) -> int:
    total = 0
    for i in ifaces:
        for d in ("tx_bytes", "rx_bytes"):
            total += int(Path(f"/sys/class/net/{i}/statistics/{d}").read_text())
    return total


def _measure(ifaces: list[str], fn: Any) -> dict[str, Any]:
    before = _wire_bytes(ifaces)
    t0 = time.perf_counter()
    extra = fn()
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "wire_bytes": _wire_bytes(ifaces) - before,
            **(extra or {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--boards", type=int, default=16)
    ap.add_argument("--mib", type=int, default=64)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (the IoT lab uses network namespaces)")
    sys.path.insert(0, str(REPO))
    from fleet.connect import transport_options
    from fleet.home import FleetHome
    from fleet.lab import iot
    from fleet.transports.ssh import SshTransport

    work = Path(tempfile.mkdtemp(prefix="fleet-bench-ssh-"))
    home_path = work / "home"
    home = FleetHome(home_path)
    _fleet(home_path, "init")
    _fleet(home_path, "keys", "init", check=False)
    model = work / "big.mnn"
    _make_model(model, args.mib)
    size = model.stat().st_size
    print(f"model {model.name}: {size / MIB:.1f} MiB; starting {args.boards} boards",
          file=sys.stderr)
    try:
        _fleet(home_path, "lab", "up", "--iot", str(args.boards), "--store-mb",
               str(3 * args.mib + 64))
        boards = [iot.board(home, f"iot{i}") for i in range(args.boards)]
        ifaces = [b["host_if"] for b in boards]
        rows: dict[str, dict[str, Any]] = {}

        # 1. parallel scp (OpenSSH, same key, same known_hosts, strict checking)
        targets = "\n".join(f"root@{b['board_addr']}:{b['agent_root']}/scp-{model.name}"
                            for b in boards) + "\n"
        scp = (f"scp -q -i {home.ssh_key} -o BatchMode=yes -o StrictHostKeyChecking=yes "
               f"-o UserKnownHostsFile={home.known_hosts} {model}")

        def run_scp() -> None:
            subprocess.run(["xargs", "-P", str(args.boards), "-I{}", "sh", "-c",
                            f"{scp} {{}}"], input=targets.encode(), check=True, timeout=900)

        rows["scp (xargs -P)"] = _measure(ifaces, run_scp)
        for b in boards:
            Path(b["agent_root"], f"scp-{model.name}").unlink(missing_ok=True)

        # 2. the transport alone, 16 threads
        opts = transport_options(home)
        devs = iot.up(home, args.boards)

        def push_one(i: int) -> int:
            with SshTransport(devs[i].uri, opts) as t:
                return t.push(model, f"{devs[i].agent_root}/push-{model.name}").bytes_sent

        def run_push() -> dict[str, Any]:
            with ThreadPoolExecutor(max_workers=args.boards) as pool:
                return {"reported_bytes": sum(pool.map(push_one, range(args.boards)))}

        rows["SshTransport.push x16 threads"] = _measure(ifaces, run_push)
        for b in boards:
            Path(b["agent_root"], f"push-{model.name}").unlink(missing_ok=True)

        # 3. fleet deploy --no-activate: package, push, verify on the device, store encrypted
        # 4. and 5. full fleet deploy (plus activation: MNN load + health benchmark), twice
        def deploy(*extra: str) -> dict[str, Any]:
            res = _fleet(home_path, "deploy", str(model), "--group", "lab-iot", "--workers",
                         str(args.boards), "--iterations", "1", "--warmup", "0", "--json",
                         *extra, check=False)
            doc = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
            statuses = [r["status"] for r in doc.get("results", [])]
            if res.returncode != 0:
                print(res.stderr[-3000:], file=sys.stderr)
            return {"exit_code": res.returncode,
                    "statuses": {s: statuses.count(s) for s in sorted(set(statuses))},
                    "reported_bytes": sum(r.get("bytes_sent") or 0
                                          for r in doc.get("results", []))}

        rows["fleet deploy --no-activate (package+push+verify+stage)"] = _measure(
            ifaces, lambda: deploy("--no-activate"))
        rows["fleet deploy (package+push+verify+activate)"] = _measure(ifaces, deploy)
        rows["fleet deploy, same version again"] = _measure(ifaces, deploy)
    finally:
        _fleet(home_path, "lab", "down", check=False)

    base = rows["scp (xargs -P)"]["wall_s"]
    for r in rows.values():
        r["vs_scp"] = round(r["wall_s"] / base, 3) if base else None
    result = {"bench": "deploy_ssh", "boards": args.boards, "model_bytes": size,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_1m": os.getloadavg()[0]},
              "rows": rows}
    out = HERE / "results" / "deploy_ssh.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\n{args.mib} MiB model to {args.boards} lab boards "
          f"(load avg {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'what':48} {'wall s':>8} {'wire MiB':>9} {'x scp':>7}")
    for name, r in rows.items():
        print(f"{name:48} {r['wall_s']:8.2f} {r['wire_bytes'] / MIB:9.1f} "
              f"{r['vs_scp']:7.2f}")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
