"""Package crypto throughput and memory: encrypt and decrypt a 512 MiB payload.

    .venv/bin/python bench/bench_crypto.py [--mib 512] [--dir /dev/shm]

Compared, in the same run, with ``openssl speed -evp aes-256-gcm -bytes 16384`` (one core)
and, because the format must hash the plaintext (the signed sha256 is what stops a fellow
recipient who knows the data key from re-sealing other content), with the true limit of
that work: AES-256-GCM and SHA-256 on one core, 1 / (1/aes + 1/sha256). Each direction
runs in its own subprocess, whose peak RSS (``ru_maxrss``) is reported next to that of a
process that only imports the same modules. Files live on a tmpfs by default so the figure
is the crypto, not the disk. Prints a table and writes ``bench/results/crypto.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MIB = 1 << 20


def _child(mode: str, args: list[str]) -> None:
    """Runs in a subprocess: one direction, then prints seconds and peak RSS as JSON."""
    from cryptography.hazmat.primitives import serialization

    from fleet.artifacts import build_package
    from fleet.core.package import (
        Recipient,
        decrypt_package,
        encrypt_chunks,
        load_trusted_public_key,
    )

    keydir = Path(args[0])
    signer = serialization.load_pem_private_key((keydir / "signer.pem").read_bytes(), None)
    device = serialization.load_pem_private_key((keydir / "device.pem").read_bytes(), None)
    t0 = time.perf_counter()
    if mode == "encrypt":
        build_package([("model.mnn", Path(args[1]))], Path(args[2]), name="bench", version=1,
                      kind="model", recipients=[Recipient.from_public_key(
                          device.public_key())],  # type: ignore[arg-type]
                      signing_key=signer, entry="model.mnn",  # type: ignore[arg-type]
                      mnn_facts=None)
    elif mode == "encrypt-only":  # the AES-GCM pass alone, no hashing, to a null sink
        size = Path(args[1]).stat().st_size
        with open(args[1], "rb", buffering=0) as src, open(os.devnull, "wb") as dst:
            encrypt_chunks(src, dst, os.urandom(32), os.urandom(32), size, MIB)
    elif mode == "decrypt":  # what staging does: authenticate every chunk, hash, no output
        pub = load_trusted_public_key((keydir / "signer.pub").read_bytes())
        decrypt_package(args[1], pub, device)  # type: ignore[arg-type]
    elif mode != "idle":
        raise SystemExit(f"unknown mode {mode}")
    seconds = time.perf_counter() - t0
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "max_rss_mib": rss_kib / 1024}))


def _run_child(mode: str, *args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, *args],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _openssl_speed(alg: str, seconds: int) -> float:
    """Bytes per second for 16 KiB blocks, one core."""
    out = subprocess.run(["openssl", "speed", "-evp", alg, "-bytes", "16384", "-seconds",
                          str(seconds)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.lower().startswith(alg.lower()):
            value = re.findall(r"([\d.]+)k", line)[-1]
            return float(value) * 1000
    raise RuntimeError(f"cannot parse openssl speed output for {alg}:\n{out}")


def _make_payload(path: Path, mib: int) -> None:
    block = bytearray(os.urandom(MIB))
    with path.open("wb") as f:
        for i in range(mib):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None)
    ap.add_argument("--openssl-seconds", type=int, default=3)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        _child(ns.child[0], ns.child[1:])
        return 0

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    size = ns.mib * MIB
    with tempfile.TemporaryDirectory(prefix="bench-crypto-", dir=ns.dir) as tmp:
        t = Path(tmp)
        signer = ed25519.Ed25519PrivateKey.generate()
        device = ec.generate_private_key(ec.SECP256R1())
        pem = serialization.PrivateFormat.PKCS8
        for name, key in (("signer.pem", signer), ("device.pem", device)):
            (t / name).write_bytes(key.private_bytes(serialization.Encoding.PEM, pem,
                                                     serialization.NoEncryption()))
        (t / "signer.pub").write_bytes(signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        src, pkg = t / "payload.bin", t / "payload.fpkg"
        print(f"making a {ns.mib} MiB payload in {tmp} ...", file=sys.stderr)
        _make_payload(src, ns.mib)
        print("openssl speed (aes-256-gcm, sha256) ...", file=sys.stderr)
        aes = _openssl_speed("aes-256-gcm", ns.openssl_seconds)
        sha = _openssl_speed("sha256", ns.openssl_seconds)
        limit = 1 / (1 / aes + 1 / sha)
        idle = _run_child("idle", str(t))
        print("encrypt ...", file=sys.stderr)
        enc = _run_child("encrypt", str(t), str(src), str(pkg))
        enc_only = _run_child("encrypt-only", str(t), str(src))
        print("decrypt ...", file=sys.stderr)
        dec = _run_child("decrypt", str(t), str(pkg))

    def row(name: str, r: dict[str, float]) -> dict[str, Any]:
        bps = size / r["seconds"]
        return {"direction": name, "seconds": round(r["seconds"], 3),
                "mib_per_s": round(bps / MIB, 1), "vs_openssl_aes_gcm": round(bps / aes, 3),
                "vs_aes_gcm_plus_sha256_limit": round(bps / limit, 3),
                "peak_rss_mib": round(r["max_rss_mib"], 1),
                "rss_over_idle_mib": round(r["max_rss_mib"] - idle["max_rss_mib"], 1)}

    rows = [row("encrypt (build_package: sha256 pass + AES-GCM pass)", enc),
            row("encrypt, AES-GCM pass only", enc_only),
            row("decrypt (stage check: AES-GCM + sha256)", dec)]
    result = {
        "payload_mib": ns.mib, "dir": ns.dir, "machine": platform.machine(),
        "cpu": _cpu_model(), "python": platform.python_version(),
        "openssl": subprocess.run(["openssl", "version"], capture_output=True,
                                  text=True).stdout.strip(),
        "openssl_aes_256_gcm_mib_s": round(aes / MIB, 1),
        "openssl_sha256_mib_s": round(sha / MIB, 1),
        "aes_gcm_plus_sha256_limit_mib_s": round(limit / MIB, 1),
        "idle_process_rss_mib": round(idle["max_rss_mib"], 1),
        "targets": {"vs_openssl_aes_gcm": 0.7, "peak_rss_mib": 64},
        "rows": rows,
    }
    _print_table(result)
    out = HERE / "results" / "crypto.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(HERE.parent)}")
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _print_table(r: dict[str, Any]) -> None:
    print(f"payload {r['payload_mib']} MiB on {r['dir']}; {r['cpu']}")
    print(f"openssl (one core, 16 KiB): aes-256-gcm {r['openssl_aes_256_gcm_mib_s']} MiB/s, "
          f"sha256 {r['openssl_sha256_mib_s']} MiB/s, both in sequence (the format's limit) "
          f"{r['aes_gcm_plus_sha256_limit_mib_s']} MiB/s")
    head = ("direction", "MiB/s", "vs openssl gcm", "vs gcm+sha limit", "peak RSS MiB",
            "over idle")
    widths = (52, 8, 15, 17, 13, 10)
    print("".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for row in r["rows"]:
        cells = (row["direction"], row["mib_per_s"], row["vs_openssl_aes_gcm"],
                 row["vs_aes_gcm_plus_sha256_limit"], row["peak_rss_mib"],
                 row["rss_over_idle_mib"])
        print("".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))
    print(f"(idle process with the same imports: {r['idle_process_rss_mib']} MiB RSS; "
          f"targets: >= {r['targets']['vs_openssl_aes_gcm']} of openssl, "
          f"< {r['targets']['peak_rss_mib']} MiB)")


if __name__ == "__main__":
    sys.exit(main())
