"""Reports on real report rows: the candidate table, grouped audit findings, the age of
offline data, FA-regression (unit and end to end) and the HTML report in headless Chromium.

One fleet for the module: two local devices, ``tiny`` v1 deployed for real, then a
recorded ``bench`` report of v1 per device with its timings scaled (d1: 1000x faster,
d2: 1000x slower than measured), then v2 deployed for real. So on d1 v2 is certainly a
regression and on d2 certainly not, whatever this machine's speed; the figures
themselves come from real activations.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fleet.artifacts import init_signing_key
from fleet.audit.candidates import candidate_table, parse_label
from fleet.audit.grouping import group_findings
from fleet.audit.regression import RULE_ID, find_regressions
from fleet.core import errors
from fleet.home import FleetHome
from fleet.registry import Registry
from fleet.registry import history as hist
from tests.conftest import REPO, local_uri

TINY = REPO / "models" / "tiny" / "tiny.mnn"
OTHER = REPO / "models" / "tiny" / "outlier.mnn"  # deployed as tiny v2
#: where the test's screenshot is copied when set (README's docs/img/report.png)
SHOT_ENV = "FLEET_REPORT_SCREENSHOT"


@dataclass
class Fleet:
    home: FleetHome
    tmp: Path
    v1_body: dict[str, Any]  # the real activate report of tiny@1 on d1
    deploy_v2: dict[str, Any]  # `fleet deploy --json` of v2

    def run(self, *args: str) -> Any:
        return CliRunner().invoke(_app(), ["--home", str(self.home.path), *args],
                                  env={"NO_COLOR": "1", "COLUMNS": "200",
                                       "FLEET_HOME": str(self.home.path)})

    def json(self, *args: str, code: int = 0) -> Any:
        r = self.run(*args, "--json")
        assert r.exit_code == code, r.output
        return json.loads(r.stdout)

    def reg(self) -> Registry:
        return Registry.open(self.home)


def _app() -> Any:
    from fleet.cli.app import app

    return app


def scaled(body: dict[str, Any], factor: float) -> dict[str, Any]:
    """A report body with every timing multiplied by ``factor`` (probe dropped)."""
    out = copy.deepcopy(body)
    out.pop("probe", None)
    for c in out.get("candidates") or []:
        for k in list(c.get("timing") or {}):
            if k.endswith("_ms"):
                c["timing"][k] *= factor
    for k in ("median_ms", "cpu_median_ms"):
        if out.get(k) is not None:
            out[k] *= factor
    if out.get("pick"):
        out["pick"]["median_ms"] *= factor
    return out


def with_medians(body: dict[str, Any], medians: dict[int, float | None], pick: int,
                 version: int) -> dict[str, Any]:
    """``body`` as ``tiny@version`` whose CPU candidates with N threads have median
    ``medians[N]`` (None: that candidate is dropped), the one with ``pick`` threads picked."""
    out = scaled(body, 1.0)
    out["version"] = version
    cands = []
    for c in out["candidates"]:
        threads = parse_label(c["label"])[3]
        assert threads is not None
        if threads not in medians or medians[threads] is None:
            continue
        c["timing"] = {**c["timing"], "median_ms": medians[threads],
                       "p90_ms": medians[threads]}
        cands.append(c)
        if threads == pick:
            out["pick"] = {**out["pick"], "label": c["label"], "median_ms": medians[threads],
                           "threads": threads}
            out["median_ms"] = medians[threads]
    out["candidates"] = cands
    return out


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("report")
    home = FleetHome.from_env(tmp / "home")
    saved = {k: os.environ.get(k) for k in ("FLEET_HOME", "FLEET_DB")}
    os.environ["FLEET_HOME"] = str(home.path)
    os.environ.pop("FLEET_DB", None)
    try:
        f = Fleet(home, tmp, {}, {})
        assert f.run("init").exit_code == 0
        init_signing_key(home)
        assert f.run("group", "create", "lab").exit_code == 0
        for name in ("d1", "d2"):
            r = f.run("device", "add", local_uri(tmp, name), "--name", name, "--group", "lab")
            assert r.exit_code == 0, r.output
        bench = ("--iterations", "3", "--warmup", "1")
        f.json("deploy", str(TINY), "-g", "lab", *bench)
        reg = f.reg()
        for name, factor in (("d1", 1e-3), ("d2", 1e3)):
            dev = reg.get_device(name)
            [v1] = hist.reports_for(reg, dev, kind="activate", limit=1)
            if name == "d1":
                f.v1_body = dict(v1.body)
            hist.add_report(reg, dev, "bench", scaled(v1.body, factor))
        f.deploy_v2 = f.json("deploy", str(OTHER), "--name", "tiny", "-g", "lab", *bench)
        yield f
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- FA-regression, on report rows made from a real report --------------------------------

def _two_versions(reg: Registry, old: dict[str, Any], new: dict[str, Any],
                  name: str = "a") -> Any:
    dev = reg.add_device(name, f"local://{name}?root=/nonexistent/{name}")
    hist.add_report(reg, dev, "activate", old)
    hist.add_report(reg, dev, "activate", new)
    return dev


def test_regression_is_the_new_picks_median_against_the_same_config_before(
        fleet: Fleet, registry: Registry) -> None:
    old = with_medians(fleet.v1_body, {1: 1.0, 2: 0.5}, pick=2, version=1)
    new = with_medians(fleet.v1_body, {1: 1.3, 2: 0.9}, pick=1, version=2)
    dev = _two_versions(registry, old, new)
    [found] = find_regressions(registry, [dev], "tiny")
    # v2 serves t1: compared with v1's t1 (1.0), not with v1's faster pick t2 (0.5)
    assert (found.version, found.previous_version) == (2, 1)
    assert found.median_ms == 1.3 and found.previous_median_ms == 1.0
    assert found.change == pytest.approx(0.3)
    assert found.conditions == "cpu/p-normal/t1"
    finding = found.to_finding()
    assert finding["id"] == RULE_ID and "+30%" in finding["message"]
    assert find_regressions(registry, [dev], "tiny", threshold=0.35) == []


def test_within_the_threshold_or_faster_is_no_regression(fleet: Fleet,
                                                         registry: Registry) -> None:
    old = with_medians(fleet.v1_body, {1: 1.0, 2: 2.0}, pick=1, version=1)
    near = with_medians(fleet.v1_body, {1: 1.09, 2: 2.0}, pick=1, version=2)
    faster = with_medians(fleet.v1_body, {1: 0.5, 2: 2.0}, pick=1, version=2)
    a = _two_versions(registry, old, near, "a")
    b = _two_versions(registry, old, faster, "b")
    assert find_regressions(registry, [a, b], "tiny") == []
    [found] = find_regressions(registry, [a, b], "tiny", threshold=0.05)
    assert found.device == "a"


def test_without_the_same_config_before_the_picks_are_compared_and_named(
        fleet: Fleet, registry: Registry) -> None:
    old = with_medians(fleet.v1_body, {1: None, 2: 0.5}, pick=2, version=1)
    new = with_medians(fleet.v1_body, {1: 0.8, 2: None}, pick=1, version=2)
    dev = _two_versions(registry, old, new)
    [found] = find_regressions(registry, [dev], "tiny")
    assert found.conditions == "picks: cpu/p-normal/t1 vs cpu/p-normal/t2"
    assert found.previous_median_ms == 0.5


def test_a_failed_candidate_is_not_a_baseline(fleet: Fleet, registry: Registry) -> None:
    old = with_medians(fleet.v1_body, {1: 0.1, 2: 1.0}, pick=2, version=1)
    for c in old["candidates"]:
        if parse_label(c["label"])[3] == 1:
            c["status"] = "failed"  # wrong outputs: its 0.1 ms means nothing
    new = with_medians(fleet.v1_body, {1: 1.05, 2: 1.2}, pick=1, version=2)
    dev = _two_versions(registry, old, new)
    # no passing t1 before: the picks (1.05 vs 1.0) are compared, within 10 %
    assert find_regressions(registry, [dev], "tiny") == []


def test_the_version_judged_and_bad_thresholds(fleet: Fleet, registry: Registry) -> None:
    old = with_medians(fleet.v1_body, {1: 1.0, 2: 2.0}, pick=1, version=1)
    new = with_medians(fleet.v1_body, {1: 2.0, 2: 2.0}, pick=1, version=2)
    dev = _two_versions(registry, old, new)
    assert find_regressions(registry, [dev], "tiny", version=1) == []  # nothing before v1
    assert find_regressions(registry, [dev], "tiny", version={"other": 2}) == []
    assert len(find_regressions(registry, [dev], "tiny", version={"a": 2})) == 1
    assert find_regressions(registry, [dev], "other-model") == []
    with pytest.raises(errors.UsageError):
        find_regressions(registry, [dev], "tiny", threshold=-0.1)


@pytest.mark.backends  # the report's queries on SQLite and PostgreSQL (tests/pgfixture.py)
def test_offline_audit_and_report_queries_do_not_grow_with_the_fleet(
        fleet: Fleet, home: FleetHome, registry: Registry) -> None:
    from sqlalchemy import event

    from fleet.report.data import gather

    def queries(n: int) -> int:
        devs = []
        for i in range(len(registry.list_devices()), n):
            dev = registry.add_device(f"q{i}", f"local://q{i}?root=/nonexistent/q{i}")
            hist.add_report(registry, dev, "activate",
                            with_medians(fleet.v1_body, {1: 1.0, 2: 2.0}, 1, 1))
            hist.add_report(registry, dev, "activate",
                            with_medians(fleet.v1_body, {1: 2.0, 2: 2.0}, 1, 2))
            devs.append(dev)
        seen: list[str] = []

        def count(*args: Any) -> None:
            seen.append(str(args[2]))

        event.listen(registry.engine, "before_cursor_execute", count)
        try:
            data = gather(home, registry, registry.list_devices())
        finally:
            event.remove(registry.engine, "before_cursor_execute", count)
        assert len(data.devices) == n and len(data.latency) == 2 * n
        assert {g.code: len(g.devices) for g in data.findings}[RULE_ID] == n
        return len(seen)

    assert queries(3) == queries(9)


def test_candidate_table_from_a_real_report(fleet: Fleet, registry: Registry) -> None:
    body = scaled(fleet.v1_body, 1.0)
    body["candidates"][-1]["status"] = "fallback"
    body["candidates"][-1]["reasons"] = ["asked for opencl, MNN ran cpu"]
    dev = registry.add_device("a", "local://a?root=/nonexistent/a")
    t = candidate_table("a", hist.add_report(registry, dev, "activate", body))
    assert t.entity == "tiny@1" and t.picked == body["pick"]["label"]
    assert [r.picked for r in t.rows].count(True) == 1
    for r in t.rows:
        assert r.backend == "cpu" and r.precision == "normal" and r.threads in (1, 2)
        assert r.cosine is not None and r.cosine > 0.99 and r.max_abs_err is not None
    failing = [r for r in t.rows if not r.passed]
    assert [r.verdict for r in failing] == ["fail (fallback): asked for opencl, MNN ran cpu"]
    assert parse_label("opencl/p-low/m-low/t4") == ("opencl", "low", "low", 4)
    assert parse_label("weird") == ("weird", "?", "?", None)


def test_findings_group_by_code_with_their_devices() -> None:
    f8 = {"id": "FA008", "severity": "info", "title": "CPU has AVX512", "message": "m"}
    f9 = {"id": "FA009", "severity": "warning", "title": "benchmark missing",
          "message": "x"}
    groups = group_findings([("d2", "tiny@1", f8), ("d1", "tiny@1", f8),
                             ("d1", "tiny@1", f9), ("d3", "det@2", {**f9, "message": "y"})])
    assert [(g.code, g.devices) for g in groups] == [("FA009", ["d1", "d3"]),
                                                    ("FA008", ["d1", "d2"])]
    assert groups[0].message == "benchmark missing"  # messages differ: the rule's title
    assert groups[0].models == ["det@2", "tiny@1"] and groups[1].message == "m"


# -- the CLI on the recorded reports ------------------------------------------------------

def test_deploy_shows_the_regression_of_the_version_it_deployed(fleet: Fleet) -> None:
    out = fleet.deploy_v2
    assert out["model"] == "tiny@2"
    assert [(r["device"], r["model"], r["previous"]) for r in out["regressions"]] == \
        [("d1", "tiny@2", "tiny@1")]
    assert out["regressions"][0]["change"] > 0.1


def test_audit_groups_findings_and_flags_the_regression(fleet: Fleet) -> None:
    live = fleet.json("audit", "-g", "lab")
    offline = fleet.json("audit", "-g", "lab", "--offline")
    for doc in (live, offline):
        assert {r["device"]: r["model"] for r in doc["rows"]} == {"d1": "tiny@2",
                                                                  "d2": "tiny@2"}
        for row in doc["rows"]:
            assert isinstance(row["findings"], list)
            assert all(isinstance(f, dict) and {"code", "severity", "message"} <= set(f)
                       for f in row["findings"])
        groups = {g["code"]: g for g in doc["findings"]}
        assert groups[RULE_ID]["devices"] == ["d1"]
        assert groups[RULE_ID]["models"] == ["tiny@2"]
        assert len(doc["findings"]) == len(groups)  # one entry per code
    assert live["source"] == "live" and offline["source"] == "stored"
    ages = offline["data"]
    assert 0 <= ages["newest_age_s"] <= ages["oldest_age_s"]
    assert all(r["reported_at"] and r["age_s"] >= 0 for r in offline["rows"])
    quiet = fleet.json("audit", "-g", "lab", "--offline", "--regression-threshold", "1e9")
    assert RULE_ID not in {g["code"] for g in quiet["findings"]}
    text = fleet.run("audit", "-g", "lab", "--offline")
    assert text.exit_code == 0 and "stored data: newest reported" in text.stdout
    assert "FA-regression" in text.stdout
    bad = fleet.run("audit", "--regression-threshold", "-5")
    assert bad.exit_code == 2


def test_reports_candidates_and_unknown_kind(fleet: Fleet) -> None:
    doc = fleet.json("reports", "d2", "--candidates")
    assert doc["device"] == "d2" and doc["model"] == "tiny@2"
    assert doc["picked"] in {c["label"] for c in doc["candidates"]}
    assert all({"backend", "precision", "memory", "threads", "median_ms", "p90_ms", "cosine",
                "max_abs_err", "verdict", "picked"} <= set(c) for c in doc["candidates"])
    text = fleet.run("reports", "d2", "--candidates")
    assert text.exit_code == 0 and "PICKED" in text.stdout and "picked:" in text.stdout
    v1 = fleet.json("reports", "d2", "--candidates", "--kind", "bench")
    assert v1["model"] == "tiny@1" and v1["kind"] == "bench"
    bad = fleet.run("reports", "d1", "--kind", "activte")
    assert bad.exit_code == 2
    assert "activate, bench, audit, probe, lora" in bad.stderr
    assert fleet.run("reports", "d1", "--candidates", "--kind", "audit").exit_code == 2


def test_html_report_renders_in_chromium(fleet: Fleet) -> None:
    from tests.report_browser import render

    page, tables = fleet.tmp / "fleet.html", fleet.tmp / "csv"
    doc = fleet.json("report", "--html", str(page), "--csv", str(tables), "-g", "lab")
    assert doc["devices"] == ["d1", "d2"] and doc["html"]["bytes"] == page.stat().st_size
    html = page.read_text()
    assert "<script src" not in html  # plotly.js is inline: it opens offline
    assert sorted(p.name for p in tables.iterdir()) == [
        "candidates.csv", "deployments.csv", "devices.csv", "findings.csv", "latency.csv"]
    assert "d1,tiny@2,tiny,2," in (tables / "latency.csv").read_text()
    shot = fleet.tmp / "report.png"
    seen = render(page, screenshot=shot)
    plots = {p["id"]: p for p in seen.plots}
    assert set(plots) == {"fig-composition", "fig-latency", "fig-candidates", "fig-findings",
                          "fig-timeline"}
    for p in plots.values():
        assert p["width"] > 100 and p["height"] > 100 and p["traces"] >= 1, p
    for name in ("d1", "d2", "tiny@1", "tiny@2", RULE_ID):
        assert name in seen.text, name
    assert seen.errors == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get(SHOT_ENV):  # `make report-screenshot`: the README's picture
        shutil.copyfile(shot, os.environ[SHOT_ENV])


def test_report_refuses_without_an_output_and_an_unknown_grid_device(fleet: Fleet) -> None:
    assert fleet.run("report").exit_code == 2
    r = fleet.run("report", "--html", str(fleet.tmp / "x.html"), "--grid-device", "nope")
    assert r.exit_code == 2 and not (fleet.tmp / "x.html").exists()
    typo = fleet.tmp / "no-such-dir" / "x.html"  # refused, not made
    r = fleet.run("report", "--html", str(typo))
    assert r.exit_code == 2 and "no folder" in r.stderr and not typo.parent.exists()


def test_offline_audit_after_a_rollback_shows_the_version_active_now(fleet: Fleet) -> None:
    assert fleet.run("rollback", "tiny", "-d", "d1").exit_code == 0
    doc = fleet.json("audit", "-g", "lab", "--offline")
    rows = {r["device"]: r for r in doc["rows"]}
    assert rows["d1"]["model"] == "tiny@1" and "rollback" in rows["d1"]["note"]
    assert rows["d2"]["model"] == "tiny@2" and rows["d2"]["note"] is None
    # v2 is no longer active on d1: its regression is not a finding there any more
    assert RULE_ID not in {g["code"] for g in doc["findings"]}
