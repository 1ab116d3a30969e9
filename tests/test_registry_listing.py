"""Listings that the database writes (fleet.registry.listing) say what the Python rows
say, on SQLite and PostgreSQL: each device's JSON equals ``device_row``, summaries are the
counts of the rows, and the facts code keeps its private keys where the listing hides them.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fleet.cli._output import to_jsonable
from fleet.cli.cmd_device import device_row
from fleet.registry import Registry
from fleet.registry import facts as facts_mod
from fleet.registry.listing import (
    DEVICE_KEYS,
    PRIVATE_FACTS,
    device_lines,
    group_summary,
    in_group,
    status_summary,
)
from fleet.registry.selectors import criteria, parse_selectors
from tests.conftest import REPO

pytestmark = pytest.mark.backends

PROBE = {"cpu": {"arch": "arm64", "vendor": "ARM", "logical_cores": 8, "fp16_arith": True,
                 "int8_dot": True, "features": {"asimd": True, "i8mm": False, "sve": False}},
         "memory": {"total_bytes": 6 * 2**30}, "os": {"name": "android", "device_model": "p7"},
         "gpu": {"opencl": {"status": "found"}}, "npu_hints": []}
STATUS = {"installed": {"tiny": {"active": 2, "previous": 1, "versions": [1, 2],
                                 "digest": "ab" * 32}}, "disk": {"free": 5 * 2**30}}


@pytest.fixture
def fleet(registry: Registry, tmp_path: Path) -> Registry:
    """Five devices: groups, tags, facts with private keys, times with and without
    microseconds, a revoked one, one never seen, one in no group."""
    registry.create_group("phones")
    registry.create_group("lab")
    uri = f"local://x?root={tmp_path}"
    registry.add_device("p1", uri, groups=["phones", "lab"], tags={"site": "a", "rack": "r1"})
    registry.add_device("p2", uri, groups=["phones"], tags={"site": "b"}, platform="android")
    registry.add_device("b1", uri, groups=["lab"])
    registry.add_device("lone", uri)
    registry.add_device("gone", uri, groups=["phones"])
    registry.record_contact("p1", None, seen=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC))
    registry.record_contact("p2", None, seen=datetime(2026, 1, 2, 3, 4, 5, 120, tzinfo=UTC))
    from fleet.core import errors

    registry.record_contact("b1", errors.TransportError("refused"))
    registry.update_device("gone", revoked_at=datetime(2026, 2, 3, 4, 5, 6, 789, tzinfo=UTC))
    with registry.session() as s:
        for name in ("p1", "p2"):
            dev = registry._device(s, name)
            facts_mod.note_probe(s, dev.id, PROBE)
            facts_mod.note_status(s, dev.id, STATUS)
    return registry


def _rows(reg: Registry) -> list[dict[str, object]]:
    groups = reg.groups_by_device()
    return [to_jsonable(device_row(d, groups.get(d.name, []))) for d in reg.list_devices()]


def test_each_line_is_the_device_row(fleet: Registry) -> None:
    lines = [json.loads(x) for x in device_lines(fleet)]
    assert lines == _rows(fleet)
    assert all(tuple(sorted(x)) == DEVICE_KEYS for x in lines)
    p1 = lines[[x["name"] for x in lines].index("p1")]
    assert p1["facts"]["hw.arch"] == "arm64" and p1["facts"]["model.tiny"] == 2
    assert not [k for k in p1["facts"] if k.startswith("_")]  # the planner's, not listed
    assert p1["last_seen"] == "2026-01-02T03:04:05+00:00" and p1["groups"] == ["lab", "phones"]


def test_lines_filtered_by_a_group_and_a_selector(fleet: Registry) -> None:
    phones = fleet.get_group("phones")
    names = [json.loads(x)["name"] for x in device_lines(fleet, where=[in_group(phones.id)])]
    assert names == ["gone", "p1", "p2"]
    where = criteria(fleet, groups=["phones"], terms=parse_selectors(["hw.arch=arm64"]))
    assert [json.loads(x)["name"] for x in device_lines(fleet, where=where)] == ["p1", "p2"]
    assert [json.loads(x)["name"] for x in device_lines(fleet, limit=2)] == ["b1", "gone"]


def test_status_summary_counts_what_the_rows_say(fleet: Registry) -> None:
    got = status_summary(fleet, ["unreachable"], attention_limit=5)
    rows = _rows(fleet)
    assert got.devices == len(rows) == 5
    assert got.by_status == {s: sum(r["status"] == s for r in rows)
                             for s in {r["status"] for r in rows}}
    assert dict(got.groups) == {"lab": 2, "phones": 3}
    assert [a["name"] for a in got.attention] == ["b1"] and got.attention_total == 1
    assert status_summary(fleet, ["ok", "enrolled", "registered"],
                          attention_limit=2).attention_total == 4


def test_group_summary_counts_all_and_lists_the_first(fleet: Registry) -> None:
    got = group_summary(fleet, "phones", limit=2)
    assert got.devices == 3 and sum(got.by_status.values()) == 3
    assert [d["name"] for d in got.first] == ["gone", "p1"]


def test_the_facts_code_writes_no_private_key_the_listing_would_show(fleet: Registry) -> None:
    """Every ``_`` key fleet.registry.facts writes is one the listing removes."""
    source = (REPO / "fleet" / "registry" / "facts.py").read_text()
    written = set(re.findall(r"""["'](_[a-z][a-z_]*)["']""", source))
    assert written and written <= set(PRIVATE_FACTS), written - set(PRIVATE_FACTS)
    stored = fleet.get_device("p1").facts
    assert {k for k in stored if k.startswith("_")} <= set(PRIVATE_FACTS)


# -- a fixed number of queries whatever the fleet size -----------------------------------
COUNTED = [("device", "list", "--ndjson"), ("device", "list", "-g", "g", "--ndjson"),
           ("device", "list", "-l", "hw.arch=arm64", "--ndjson"), ("device", "list"),
           ("device", "list", "-g", "g", "--json"), ("status",), ("status", "--json"),
           ("group", "show", "g"), ("group", "show", "g", "--json")]


def _grow(reg: Registry, tmp_path: Path, start: int, stop: int) -> None:
    """Devices ``start..stop-1`` in group g, tagged, probed, half of them contacted."""
    uri = f"local://x?root={tmp_path}"
    for i in range(start, stop):
        reg.add_device(f"d{i:03d}", uri, groups=["g"], tags={"site": f"s{i % 3}"})
        if i % 2:
            reg.record_contact(f"d{i:03d}", None, seen=datetime(2026, 1, 2, tzinfo=UTC))
    with reg.session() as s:
        for i in range(start, stop):
            facts_mod.note_probe(s, reg._device(s, f"d{i:03d}").id, PROBE)


def _statements(run_fleet, args: tuple[str, ...]) -> int:  # type: ignore[no-untyped-def]
    """SQL statements one in-process CLI command sends (SQLAlchemy's cursor hook)."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    sent: list[str] = []

    def hook(_conn, _cursor, statement, *_rest) -> None:  # type: ignore[no-untyped-def]
        sent.append(statement)

    event.listen(Engine, "before_cursor_execute", hook)
    try:
        r = run_fleet(*args)
    finally:
        event.remove(Engine, "before_cursor_execute", hook)
    assert r.exit_code == 0, r.output
    return len(sent)


def test_listings_send_as_many_statements_for_10x_the_devices(
        registry: Registry, run_fleet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """No per-device query in a loop: listing, status and group show send the same
    statements for 3 devices as for 30 (ten times as many rows)."""
    registry.create_group("g")
    _grow(registry, tmp_path, 0, 3)
    small = {args: _statements(run_fleet, args) for args in COUNTED}
    _grow(registry, tmp_path, 3, 30)
    large = {args: _statements(run_fleet, args) for args in COUNTED}
    assert large == small
    assert all(0 < n < 20 for n in small.values()), small
    lines = run_fleet("device", "list", "-g", "g", "--ndjson").output.splitlines()
    assert len(lines) == 30  # the larger fleet was listed whole
