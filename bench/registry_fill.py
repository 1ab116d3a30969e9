"""Fill a registry with N synthetic devices, fast (bulk inserts, no agent, no API loop).

Each device gets: membership of ``big`` (every device) and of one of ten ``site-K``
groups, two tags, a status (90 % ok, 5 % unreachable, 3 % degraded, 2 % enrolled), a
capability snapshot (a probe document of ~1 KiB: 30 % arm64, the rest x86_64), an
``activate`` report, and, when the schema has them, the selector facts a probe and an
activation of ``tiny@1`` leave (``devices.facts``, :mod:`fleet.registry.facts`). Used by
bench/bench_registry.py; ``python bench/registry_fill.py URL N`` fills one by hand.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

import fleet.registry.models  # noqa: F401  (registers the tables)

BIG = "big"
SITES = 10
CHUNK = 5_000
STATUSES = ["ok"] * 90 + ["unreachable"] * 5 + ["degraded"] * 3 + ["enrolled"] * 2


def device_name(i: int) -> str:
    return f"dev{i:06d}"


def probe_doc(i: int) -> dict[str, Any]:
    """A capability probe in the shape of ``fleet.probe/1`` (docs/probe.md), ~1 KiB."""
    arm = i % 10 < 3
    feats = ({"asimd": True, "asimdhp": i % 2 == 0, "asimddp": True, "i8mm": i % 3 == 0,
              "sve": False, "sve2": False, "sme": False, "bf16": False} if arm else
             {"avx2": True, "avx512f": i % 4 == 0, "avx512_bf16": False, "fma": True})
    return {
        "schema": "fleet.probe/1",
        "cpu": {"arch": "arm64" if arm else "x86_64",
                "vendor": "ARM" if arm else "GenuineIntel", "logical_cores": 4 + i % 5,
                "fp16_arith": arm and i % 2 == 0, "int8_dot": True, "features": feats,
                "clusters": [{"cores": 4, "max_mhz": 2400}]},
        "memory": {"total_bytes": (2 + i % 7) * 2**30},
        "os": {"name": "android" if arm else "linux", "device_model": f"model-{i % 37}",
               "kernel": "6.1.0"},
        "gpu": {"opencl": {"status": "found" if i % 5 == 0 else "absent"},
                "vulkan": {"status": "absent"}},
        "npu_hints": [],
        "mnn": {"backends": ["cpu"], "version": "3.6.1"},
    }


def _table(name: str) -> Table:
    return SQLModel.metadata.tables[name]


def _chunks(n: int) -> Iterator[range]:
    for start in range(0, n, CHUNK):
        yield range(start, min(n, start + CHUNK))


def _facts(i: int, probe: dict[str, Any], now: datetime) -> dict[str, Any]:
    """What fleet.registry.facts keeps after a probe and an activation of tiny@1."""
    from fleet.registry.facts import hw_facts

    at = now.isoformat(timespec="seconds")
    free = (8 + i % 24) * 2**30
    return {**hw_facts(probe), "_probed_at": at, "_status_at": at, "_disk_free": free,
            "disk.free_gb": round(free / 2**30, 2), "model.tiny": 1,
            "_installed": {"tiny": {"active": 1, "previous": None, "versions": [1],
                                    "digest": "ab" * 32}}}


def fill(conn: Connection, n: int, *, now: datetime | None = None) -> dict[str, uuid.UUID]:
    """Insert ``n`` devices and everything around them in ``conn``'s transaction (commit is
    the caller's). Returns the group ids by name."""
    now = now or datetime.now(UTC)
    devices, groups, members = _table("devices"), _table("groups"), _table("memberships")
    snaps, reports = _table("capability_snapshots"), _table("reports")
    has_facts = "facts" in devices.c
    gids = {BIG: uuid.uuid4(), **{f"site-{k}": uuid.uuid4() for k in range(SITES)}}
    conn.execute(insert(groups), [{"id": gid, "name": name, "description": "",
                                   "created_at": now} for name, gid in gids.items()])
    for part in _chunks(n):
        ids = [uuid.uuid4() for _ in part]
        probes = [probe_doc(i) for i in part]
        rows = []
        for i, dev_id, probe in zip(part, ids, probes, strict=True):
            row = {"id": dev_id, "name": device_name(i),
                   "platform": "android" if i % 10 < 3 else "linux",
                   "uri": f"ssh://root@10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:22",
                   "tags": {"site": f"s{i % SITES}", "rack": f"r{i % 97}"},
                   "status": STATUSES[i % len(STATUSES)],
                   "last_seen": now - timedelta(seconds=i % 86_400),
                   "last_error": "connect" if STATUSES[i % len(STATUSES)] == "unreachable"
                   else None, "agent_version": "0.1.0", "agent_root": "/var/lib/fleet",
                   "agent_cmd": None, "public_key": None, "fingerprint": f"SHA256:{i:043d}",
                   "root_version": 1, "revoked_at": None, "created_at": now}
            if has_facts:
                row["facts"] = _facts(i, probe, now)
            rows.append(row)
        conn.execute(insert(devices), rows)
        conn.execute(insert(members), [
            {"group_id": gid, "device_id": dev_id, "added_at": now}
            for i, dev_id in zip(part, ids, strict=True)
            for gid in (gids[BIG], gids[f"site-{i % SITES}"])])
        conn.execute(insert(snaps), [
            {"id": uuid.uuid4(), "device_id": dev_id, "taken_at": now, "probe": probe}
            for dev_id, probe in zip(ids, probes, strict=True)])
        conn.execute(insert(reports), [
            {"id": uuid.uuid4(), "device_id": dev_id, "deployment_id": None,
             "kind": "activate", "model_name": "tiny", "model_version": 1,
             "configured_backend": "auto", "effective_backend": "cpu",
             "recommended_backend": "cpu", "median_ms": 1.5 + (i % 100) / 100,
             "body": {"name": "tiny", "version": 1, "pick": {"backend": "cpu"}},
             "created_at": now - timedelta(minutes=i % 60)}
            for i, dev_id in zip(part, ids, strict=True)])
    return gids


def main() -> int:
    from fleet.registry.db import make_engine, migrate

    url, n = sys.argv[1], int(sys.argv[2])
    migrate(url)
    engine = make_engine(url)
    with engine.begin() as conn:
        fill(conn, n)
    engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
