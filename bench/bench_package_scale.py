"""A package for 1k, 10k and 100k devices: build time, package size, what one device
downloads and verifies, with every wrapped key in the signed manifest (format 1, the old
form) against per-device key envelopes (format 2, what the controller builds now).

    .venv/bin/python bench/bench_package_scale.py [--counts 1000,10000,100000]
        [--payload-mib 4] [--key-cache DIR]

Keys: ``N`` distinct device P-256 keys, made once and cached as PEM (what the registry
holds) in ``--key-cache`` (default ``$TMPDIR/fleet-bench-package-keys``), so a re-run
measures the same keys. Each (form, N) runs in its own subprocess through the real build
function (``fleet.artifacts.build_package``, the one ``fleet package`` and ``fleet
deploy`` call; the registry and CLI are left out): loading the keys as
``fleet.artifacts.recipients.recipients_of`` does (PEM -> key, fingerprint), the build
itself, then the first device's side: read and verify the header and open its data key
(format 2: after finding its envelope in the bundle), with the device's default limits
and, where those refuse the manifest, with a raised limit to show what it would cost.
Format 1 past about 4,600 devices is refused at build time (its manifest would exceed
the 1 MiB devices accept); the bench then builds it with a raised limit to measure it.
Prints a table and writes ``bench/results/package_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
ENVELOPE_BYTES = 181


def _key_cache(cache: Path, n: int) -> tuple[Path, Path]:
    """``keys.pem`` with at least ``n`` public keys (one PEM each) and ``device0.pem``,
    the private key of the first; extended when more are needed."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cache.mkdir(parents=True, exist_ok=True)
    keys, dev0 = cache / "keys.pem", cache / "device0.pem"
    have = keys.read_bytes().count(b"-----BEGIN") if keys.exists() else 0
    if have >= n and dev0.exists():
        return keys, dev0
    print(f"making {n - have} P-256 keys in {cache} ...", file=sys.stderr)
    with keys.open("ab") as f:
        for i in range(have, n):
            k = ec.generate_private_key(ec.SECP256R1())
            if i == 0:
                dev0.write_bytes(k.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
            f.write(k.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return keys, dev0


def _pems(keys: Path, n: int) -> list[bytes]:
    end = b"-----END PUBLIC KEY-----\n"
    return [p + end for p in keys.read_bytes().split(end)[:n]]


def _child(form: str, n: int, keys: Path, dev0: Path, payload: Path, work: Path
           ) -> dict[str, Any]:
    """One build and one device's check, in this (fresh) process."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    from fleet.artifacts import build_package
    from fleet.core import errors
    from fleet.core.package import Limits, Recipient, bundle_path, find_envelope, open_header
    from fleet.core.package.layout import parse_header

    pems = _pems(keys, n)
    device = serialization.load_pem_private_key(dev0.read_bytes(), None)
    assert isinstance(device, ec.EllipticCurvePrivateKey)
    signer = ed25519.Ed25519PrivateKey.generate()
    t0 = time.perf_counter()
    recipients = [Recipient.from_pem(p, name=f"d{i}") for i, p in enumerate(pems)]
    t1 = time.perf_counter()
    out = work / f"{form}-{n}.fpkg"
    # Format 1 past the device limit is refused by the build (UsageError, tested in
    # tests/test_envelope_attacks.py); measured here with the limit raised.
    build_package([("model.mnn", payload)], out, name="scale", version=1, kind="model",
                  recipients=recipients, signing_key=signer, entry="model.mnn",
                  mnn_facts=None, envelopes=form == "envelope",
                  limits=Limits(max_manifest_bytes=256 * MIB))
    t2 = time.perf_counter()
    header = parse_header(out.read_bytes()[:64 * MIB], Limits(max_manifest_bytes=256 * MIB))
    build_refusal = None
    if len(header.manifest_bytes) > Limits().max_manifest_bytes:
        build_refusal = (f"UsageError: manifest of {len(header.manifest_bytes)} bytes, over "
                         f"the {Limits().max_manifest_bytes} devices accept")
    bundle = bundle_path(out)
    fp = recipients[0].fingerprint

    def device_side(limits: Limits) -> tuple[float, bytes | None]:
        s = time.perf_counter()
        env = find_envelope(bundle, fp) if form == "envelope" else None
        with out.open("rb") as f:
            opened = open_header(f, signer.public_key(), device, envelope=env, limits=limits)
        assert opened.data_key is not None
        return time.perf_counter() - s, env

    refusal = None
    try:
        verify_s, env = device_side(Limits())
        raised_s = None
    except errors.SizeLimitError as exc:
        refusal = f"{type(exc).__name__}: {exc.message}"
        raised_s, env = device_side(Limits(max_manifest_bytes=256 * MIB))
        verify_s = None
    pkg_size = out.stat().st_size
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.unlink()
    bundle_size = bundle.stat().st_size if bundle.exists() else 0
    bundle.unlink(missing_ok=True)
    return {
        "form": form, "format": 2 if form == "envelope" else 1, "recipients": n,
        "load_keys_s": round(t1 - t0, 3), "build_s": round(t2 - t1, 3),
        "build_us_per_recipient": round((t2 - t1) / n * 1e6, 1),
        "package_bytes": pkg_size, "manifest_bytes": len(header.manifest_bytes),
        "header_bytes": header.payload_offset, "bundle_bytes": bundle_size,
        "device_download_bytes": pkg_size + (len(env) if env else 0),
        "build_refusal": build_refusal,
        "device_verify_ms": None if verify_s is None else round(verify_s * 1000, 2),
        "device_refusal": refusal,
        "device_verify_ms_raised_limit": None if raised_s is None
        else round(raised_s * 1000, 2),
        "peak_rss_mib": round(rss, 1),
    }


def _run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                         text=True, check=True)
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return doc


def _print_table(rows: list[dict[str, Any]], payload: int) -> None:
    print(f"payload {payload / MIB:.0f} MiB; one device = the first recipient")
    head = ("form", "devices", "keys s", "build s", "package", "manifest", "bundle",
            "1 device gets", "device verify")
    widths = (10, 9, 8, 17, 12, 12, 12, 14, 30)
    print("".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        if r["device_verify_ms"] is not None:
            dv = f"{r['device_verify_ms']} ms"
        else:
            dv = f"refused ({r['device_verify_ms_raised_limit']} ms if allowed)"
        build = f"{r['build_s']}" + (" (refused)" if r["build_refusal"] else "")
        cells = (r["form"], r["recipients"], r["load_keys_s"], build,
                 _size(r["package_bytes"]), _size(r["manifest_bytes"]),
                 _size(r["bundle_bytes"]), _size(r["device_download_bytes"]), dv)
        print("".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))


def _size(n: int) -> str:
    for unit, k in (("MiB", MIB), ("KiB", 1024)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="1000,10000,100000")
    ap.add_argument("--payload-mib", type=int, default=4)
    ap.add_argument("--key-cache", type=Path,
                    default=Path(tempfile.gettempdir()) / "fleet-bench-package-keys")
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        form, n, keys, dev0, payload, work = ns.child
        print(json.dumps(_child(form, int(n), Path(keys), Path(dev0), Path(payload),
                                Path(work))))
        return 0
    counts = [int(c) for c in ns.counts.split(",")]
    keys, dev0 = _key_cache(ns.key_cache, max(counts))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pkg-scale-") as tmp:
        payload = Path(tmp) / "model.mnn"
        payload.write_bytes(os.urandom(ns.payload_mib * MIB))
        for n in counts:
            for form in ("inline", "envelope"):
                print(f"{form}, {n} devices ...", file=sys.stderr)
                rows.append(_run_child(form, str(n), str(keys), str(dev0), str(payload),
                                       tmp))
    by = {(r["form"], r["recipients"]): r for r in rows}
    lo, hi = min(counts), max(counts)

    def per_recipient(form: str, key: str) -> float:
        return round((by[(form, hi)][key] - by[(form, lo)][key]) / (hi - lo), 1)

    result = {
        "machine": platform.machine(), "cpu": _cpu_model(), "cores": os.cpu_count(),
        "python": platform.python_version(), "payload_bytes": ns.payload_mib * MIB,
        "envelope_bytes": ENVELOPE_BYTES,
        "note": "inline = format 1 (every wrapped key in the signed manifest, the form "
                "before issue 16); envelope = format 2 (per-device key envelopes in a "
                "bundle beside the package; a device gets the package and its 181-byte "
                "envelope). Both built in this run by the same build function.",
        "growth_bytes_per_recipient": {
            form: {"package": per_recipient(form, "package_bytes"),
                   "manifest": per_recipient(form, "manifest_bytes"),
                   "device_download": per_recipient(form, "device_download_bytes"),
                   "bundle (controller only)": per_recipient(form, "bundle_bytes")}
            for form in ("inline", "envelope") if lo != hi},
        "rows": rows,
    }
    _print_table(rows, ns.payload_mib * MIB)
    if lo != hi:
        print("bytes per extra recipient:", json.dumps(result["growth_bytes_per_recipient"]))
    out = HERE / "results" / "package_scale.json"
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


if __name__ == "__main__":
    sys.exit(main())
