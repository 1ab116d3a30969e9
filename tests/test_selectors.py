"""Selectors: the grammar, the facts a probe/status/activation leaves on a device, and the
SQL that selects (on SQLite and PostgreSQL, in a fixed number of queries)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from fleet.cli._targets import Targets, parse_target_text
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry, facts
from fleet.registry import history as hist
from fleet.registry.facts import HW_FACTS, hw_facts
from fleet.registry.selectors import parse_selector, parse_selectors, select_devices
from tests.conftest import REPO

SAMPLE = json.loads((REPO / "docs" / "probe-samples" / "nvidia-h100.json").read_text())


def _arm_probe() -> dict[str, Any]:
    """A Cortex-A76-class phone: arm64, fp16, dotprod, i8mm, no SVE, 3.6 GiB, OpenCL."""
    doc = copy.deepcopy(SAMPLE)
    doc["cpu"].update(arch="arm64", vendor="ARM", logical_cores=8, fp16_arith=True,
                      int8_dot=True, features={
                          "asimd": True, "neon": True, "fphp": True, "asimdhp": True,
                          "asimddp": True, "i8mm": True, "bf16": False, "sve": False,
                          "sve2": False, "sme": False, "sme2": False})
    doc["memory"]["total_bytes"] = int(3.6 * 2**30)
    doc["os"].update(name="android", device_model="Pixel 7",
                     android={"sdk": 34, "model": "Pixel 7"})
    doc["gpu"]["cuda"] = {"status": "not_found", "reason": "x", "devices": []}
    doc["gpu"]["vulkan"] = {"status": "failed", "reason": "crashed", "devices": []}
    return doc


def _small_x86() -> dict[str, Any]:
    doc = copy.deepcopy(SAMPLE)
    doc["cpu"].update(logical_cores=4, fp16_arith=False, int8_dot=False)
    doc["memory"]["total_bytes"] = 8 * 2**30
    doc["gpu"]["cuda"] = {"status": "not_found", "reason": "x", "devices": []}
    return doc


def test_a_probe_flattens_to_typed_hw_facts() -> None:
    f = hw_facts(SAMPLE)
    assert f["hw.arch"] == "x86_64" and f["hw.cores"] == 16 and f["hw.ram_gb"] == 125.87
    assert f["hw.fp16"] is True and f["hw.gpu.cuda"] is True and f["hw.gpu.metal"] is False
    assert f["hw.sve"] is False and f["hw.i8mm"] is False  # x86 has no such keys: false
    arm = hw_facts(_arm_probe())
    assert arm["hw.arch"] == "arm64" and arm["hw.i8mm"] is True and arm["hw.sve"] is False
    assert arm["hw.android.sdk"] == 34 and arm["hw.gpu.vulkan"] is False
    assert set(f) <= set(HW_FACTS) and set(arm) <= set(HW_FACTS)
    # unknown values are left out, never stored as null or as the wrong type
    broken = copy.deepcopy(SAMPLE)
    broken["cpu"]["logical_cores"] = "16"
    broken["memory"]["total_bytes"] = None
    got = hw_facts(broken)
    assert "hw.cores" not in got and "hw.ram_gb" not in got
    assert hw_facts({}) == {}


def test_selector_grammar_and_its_errors() -> None:
    t = parse_selector("hw.arch=aarch64,site!=lab,hw.ram_gb>=4,hw.fp16=yes,rack,!broken")
    assert [(x.key, x.op, x.value) for x in t] == [
        ("hw.arch", "=", "arm64"), ("site", "!=", "lab"), ("hw.ram_gb", ">=", 4.0),
        ("hw.fp16", "=", True), ("rack", "exists", None), ("broken", "absent", None)]
    assert [x.kind for x in t] == ["fact", "tag", "fact", "fact", "tag", "tag"]
    assert str(t[2]) == "hw.ram_gb>=4" and str(t[5]) == "!broken"
    assert parse_selector("model=tiny@2")[0].kind == "model"
    assert parse_selector("model.tiny>=2")[0].value == 2.0
    assert parse_selector("hw.arch==x86_64")[0].op == "="
    bad = {
        "hw.nope=1": "hw.arch, hw.cpu.vendor",  # unknown hw key: lists the known ones
        "hw.arch>=3": "numeric",
        "site>2": "numeric",
        "hw.ram_gb>=lots": "takes a number",
        "hw.fp16=maybe": "true or false",
        "a=b,,c=d": "empty term",
        "": "empty term",
        "!site=lab": "before a lone key",
        "site=": "needs a value",
        "=x": "cannot read",
        "model": "model=NAME",
        "model=tiny@x": "NAME@VERSION",
        "disk.used=3": "disk.free_gb",
    }
    for text, message in bad.items():
        with pytest.raises(errors.UsageError, match=re.escape(message)) as exc:
            parse_selector(text)
        assert type(exc.value) is errors.UsageError, text  # exit 2, not 5 or 26


def test_targets_describe_round_trips_through_the_recorded_target() -> None:
    tg = Targets.parse(["phones", "phones"], ["pi 4"], ["site=lab,hw.fp16=true"])
    assert tg.groups == ("phones",)  # no repeats
    assert parse_target_text(tg.describe()) == tg.to_dict()
    assert parse_target_text("a,b") == {"groups": [], "devices": [], "selectors": [],
                                        "text": "a,b"}  # recorded before selectors


def _fleet(reg: Registry, tmp_path: Path) -> None:
    """x86lab (probed, g1), armlab (probed, g2), x86other (probed), unprobed (site=lab),
    notag (no tags, no probe)."""
    reg.create_group("g1")
    reg.create_group("g2")
    spec = {"x86lab": ({"site": "lab"}, ["g1"], SAMPLE),
            "armlab": ({"site": "lab", "rack": "3"}, ["g2"], _arm_probe()),
            "x86other": ({"site": "other"}, [], _small_x86()),
            "unprobed": ({"site": "lab"}, ["g1"], None),
            "notag": ({}, [], None)}
    for name, (tags, groups, probe) in spec.items():
        dev = reg.add_device(name, f"local://{name}?root={tmp_path / name}", tags=tags,
                             groups=groups)
        if probe is not None:
            hist.add_snapshot(reg, dev, probe)


def _names(reg: Registry, *selectors: str, groups: tuple[str, ...] = (),
           devices: tuple[str, ...] = ()) -> set[str]:
    return {d.name for d in select_devices(reg, groups=groups, devices=devices,
                                           terms=parse_selectors(selectors))}


@pytest.mark.backends
def test_selectors_select_in_sql(registry: Registry, tmp_path: Path) -> None:
    _fleet(registry, tmp_path)
    probed = {"x86lab", "armlab", "x86other"}
    cases = {
        "hw.arch=x86_64,site=lab": {"x86lab"},
        "hw.arch=aarch64": {"armlab"},  # the alias of arm64
        "site=lab": {"x86lab", "armlab", "unprobed"},
        "site!=lab": {"x86other", "notag"},  # kubectl: no tag matches !=
        "rack": {"armlab"},
        "!rack": {"x86lab", "x86other", "unprobed", "notag"},
        "hw.ram_gb>=4": {"x86lab", "x86other"},
        "hw.ram_gb<4": {"armlab"},
        "hw.ram_gb>125.87": set(),
        "hw.ram_gb<=125.87,hw.cores>4": {"x86lab", "armlab"},
        "hw.fp16=true": {"x86lab", "armlab"},
        "hw.fp16=false": {"x86other"},
        "hw.fp16!=true": {"x86other"},  # an unprobed device matches no hw.* selector
        "hw.gpu.cuda": {"x86lab"},  # a boolean alone: true
        "!hw.gpu.cuda": {"armlab", "x86other"},  # and negated: false, never unknown
        "hw.i8mm=true,hw.sve=false,hw.dotprod": {"armlab"},
        "hw.gpu.opencl": probed,
        "hw.os=android,hw.android.sdk>=33": {"armlab"},
        "hw.cpu.vendor=GenuineIntel": {"x86lab", "x86other"},
        "hw.arch!=arm64": {"x86lab", "x86other"},
        "!hw.arch": {"unprobed", "notag"},
        "platform=linux": probed | {"unprobed", "notag"},
        "platform=android": set(),
    }
    for sel, want in cases.items():
        assert _names(registry, sel) == want, sel
    assert _names(registry, "site=lab", "hw.fp16=true") == {"x86lab", "armlab"}  # -l -l
    # -g and -d are a union, then every -l filters it
    assert _names(registry, groups=("g1",), devices=("armlab",)) == {"x86lab", "unprobed",
                                                                      "armlab"}
    assert _names(registry, "hw.fp16=true", groups=("g1",), devices=("armlab",)) == {
        "x86lab", "armlab"}
    assert _names(registry, "site=other", groups=("g1", "g2")) == set()
    with pytest.raises(errors.NotFoundError, match="no group named 'nope', no device named "
                                                   "'ghost'"):
        _names(registry, groups=("nope", "g1"), devices=("ghost",))
    with pytest.raises(errors.NoTargetsError, match="no device matches -g g1 -l site=other"):
        Targets.parse(["g1"], [], ["site=other"]).resolve(registry)
    assert Targets.parse([], [], ["site=other,hw.ram_gb>99"]).resolve(
        registry, required=False) == []
    with pytest.raises(errors.UsageError, match="name the targets"):
        Targets.parse().resolve(registry)


@pytest.mark.backends
def test_model_and_disk_facts_follow_status_activation_and_rollback(
        registry: Registry, tmp_path: Path) -> None:
    a = registry.add_device("a", f"local://a?root={tmp_path / 'a'}")
    b = registry.add_device("b", f"local://b?root={tmp_path / 'b'}")
    status = {"installed": {"tiny": {"kind": "model", "active": 1, "previous": None,
                                     "versions": [1], "version": 1, "digest": "d1"},
                            "chat": {"kind": "lora", "active": 3}},
              "disk": {"free": 3 * 2**30, "total": 8 * 2**30}}
    facts.record_status(registry, a.id, status)
    with registry.session() as s:
        facts.note_activation(s, b.id, {"name": "tiny", "version": 2, "previous": None,
                                        "digest": "d2", "probe": _arm_probe()})
    got = registry.get_device("a").facts
    assert got["model.tiny"] == 1 and "model.chat" not in got  # models, not LoRA packs
    assert got["disk.free_gb"] == 3.0 and got["_disk_free"] == 3 * 2**30
    assert _names(registry, "model=tiny") == {"a", "b"}
    assert _names(registry, "model=tiny@2") == {"b"}
    assert _names(registry, "model.tiny>=2") == {"b"}
    assert _names(registry, "model!=tiny") == set()
    assert _names(registry, "disk.free_gb>=2") == {"a"}
    assert _names(registry, "hw.arch=arm64") == {"b"}
    # b activates 3 over 2, then rolls back: model.tiny follows, previous is known
    with registry.session() as s:
        facts.note_activation(s, b.id, {"name": "tiny", "version": 3, "previous": 2})
    assert registry.get_device("b").facts["_installed"]["tiny"]["previous"] == 2
    facts.record_rollback(registry, b.id, "tiny", 2, None)
    doc = registry.get_device("b").facts
    assert doc["model.tiny"] == 2 and doc["_installed"]["tiny"]["versions"] == [2, 3]
    assert doc["hw.arch"] == "arm64"  # a model change keeps the hardware facts
    # a new probe replaces every hw.* fact
    hist.add_snapshot(registry, registry.get_device("b"), SAMPLE)
    assert _names(registry, "hw.arch=arm64") == set()
    assert "hw.android.sdk" not in registry.get_device("b").facts


@pytest.mark.backends
def test_selection_takes_a_fixed_number_of_queries(registry: Registry,
                                                   tmp_path: Path) -> None:
    def count(n: int) -> int:
        for i in range(n):
            dev = registry.add_device(f"x{n}-{i}", f"local://x?root={tmp_path / str(i)}",
                                      tags={"site": "lab"}, groups=["g"])
            hist.add_snapshot(registry, dev, SAMPLE)
        seen: list[str] = []

        def on_exec(*args: Any) -> None:
            seen.append(str(args[2]))

        event.listen(registry.engine, "before_cursor_execute", on_exec)
        try:
            devs = Targets.parse(["g"], [f"x{n}-0"], ["site=lab,hw.fp16=true"]).resolve(
                registry)
        finally:
            event.remove(registry.engine, "before_cursor_execute", on_exec)
        assert len(devs) >= n
        return len([q for q in seen if q.lstrip().upper().startswith("SELECT")])

    registry.create_group("g")
    assert count(3) == count(30) == 2  # names checked, then one selection


@pytest.mark.backends
def test_migration_backfills_facts_from_snapshots_and_reports(tmp_path: Path, db_url: str
                                                              ) -> None:
    import uuid
    from datetime import UTC, datetime

    import sqlalchemy as sa

    from fleet.registry.db import make_engine, migrate
    from fleet.registry.types import UTCDateTime

    url = db_url
    migrate(url, "e5a7d3c91b24")
    dev_id, now = uuid.uuid4(), datetime(2026, 1, 1, tzinfo=UTC)
    devices = sa.table("devices", *(sa.column(c) for c in (
        "name", "platform", "uri", "status")), sa.column("id", sa.Uuid()),
        sa.column("tags", sa.JSON()), sa.column("created_at", UTCDateTime()))
    snaps = sa.table("capability_snapshots", sa.column("id", sa.Uuid()),
                     sa.column("device_id", sa.Uuid()), sa.column("probe", sa.JSON()),
                     sa.column("taken_at", UTCDateTime()))
    reports = sa.table("reports", sa.column("id", sa.Uuid()), sa.column("device_id", sa.Uuid()),
                       sa.column("kind"), sa.column("model_name"), sa.column("model_version"),
                       sa.column("body", sa.JSON()), sa.column("created_at", UTCDateTime()))
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(devices.insert().values(id=dev_id, name="old", platform="linux",
                                             uri="local://old", status="ok", tags={},
                                             created_at=now))
        conn.execute(sa.insert(devices).values(id=uuid.uuid4(), name="bare",
                                               platform="linux", uri="local://bare",
                                               status="ok", tags={}, created_at=now))
        for i, probe in enumerate((SAMPLE, _arm_probe())):  # the later one wins
            conn.execute(snaps.insert().values(id=uuid.uuid4(), device_id=dev_id,
                                               probe=probe,
                                               taken_at=now.replace(hour=i + 1)))
        for i, ver in enumerate((1, 2)):
            conn.execute(reports.insert().values(
                id=uuid.uuid4(), device_id=dev_id, kind="activate", model_name="tiny",
                model_version=ver, body={}, created_at=now.replace(hour=i + 1)))
    engine.dispose()
    migrate(url)
    home = FleetHome.from_env(tmp_path / "h", url)
    reg = Registry.open(home)
    old = reg.get_device("old").facts
    assert old["hw.arch"] == "arm64" and old["model.tiny"] == 2
    assert old["_probed_at"].startswith("2026-01-01T02:00")
    assert reg.get_device("bare").facts == {}
    assert _names(reg, "hw.arch=arm64,model=tiny@2") == {"old"}
    reg.close()


def test_docs_list_every_hardware_key() -> None:
    text = (REPO / "docs" / "selectors.md").read_text()
    documented = set(re.findall(r"^\| `(hw\.[a-z0-9_.]+)` \|", text, re.M))
    assert documented == set(HW_FACTS)
