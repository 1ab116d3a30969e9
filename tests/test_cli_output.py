"""Output that pipes (issue 15): `fleet device list | cat` keeps whole URIs; `-o json|yaml|
wide|tsv` are views of the same document as `--json`; sizes are binary units."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleet.cli._formats import cell_text, rows_of
from fleet.cli._options import requested_format
from fleet.cli._output import OutputFormat, human_bytes
from fleet.home import FleetHome
from tests.conftest import REPO

LONG = "/srv/fleet/site-berlin/rack-07/shelf-3/a-folder-name-long-enough-to-pass-80-columns"


@pytest.fixture
def two_devices(run_fleet, home: FleetHome):  # type: ignore[no-untyped-def]
    assert run_fleet("init").exit_code == 0
    assert run_fleet("group", "create", "lab").exit_code == 0
    for n in ("pixel7", "pi4"):
        r = run_fleet("device", "add", f"local://{n}?root={LONG}/{n}", "--name", n, "-g",
                      "lab", "-t", "site=lab1", "--no-enroll")
        assert r.exit_code == 0, r.output
    return run_fleet


def test_device_list_piped_shows_whole_uris(two_devices, home: FleetHome) -> None:  # type: ignore[no-untyped-def]
    """A real process with stdout on a pipe and COLUMNS=80, as `fleet device list | cat`."""
    env = {**os.environ, "FLEET_HOME": str(home.path), "COLUMNS": "80", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-m", "fleet", "device", "list"], cwd=REPO, env=env,
                       capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stderr
    for n in ("pixel7", "pi4"):
        assert f"local://{n}?root={LONG}/{n}" in r.stdout, r.stdout
    assert "…" not in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) > 80


def test_every_format_is_the_json_document(two_devices) -> None:  # type: ignore[no-untyped-def]
    run = two_devices
    doc = json.loads(run("device", "list", "--json").stdout)
    assert json.loads(run("device", "list", "-o", "json").stdout) == doc
    assert json.loads(run("device", "list", "--output=JSON").stdout) == doc
    y = yaml.safe_load(run("device", "list", "-o", "yaml").stdout)
    assert [(d["name"], d["uri"], d["tags"]) for d in y] == \
        [(d["name"], d["uri"], d["tags"]) for d in doc]
    tsv = run("device", "list", "-o", "tsv").stdout.splitlines()
    header = tsv[0].split("\t")
    assert {"name", "uri", "status", "tags", "fingerprint", "groups"} <= set(header)
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in tsv[1:]]
    assert [(r["name"], r["uri"], r["tags"], r["groups"]) for r in rows] == \
        [(d["name"], d["uri"], "site=lab1", "lab") for d in doc]
    wide = run("device", "list", "-o", "wide").stdout
    first = wide.splitlines()[0].split()
    assert first[:2] == ["name", "platform"] and "fingerprint" in first and "tags" in first
    assert all(f"local://{d['name']}?root={LONG}/{d['name']}" in wide for d in doc)
    # an object with a list of rows: the list is the table, wide puts the rest above it
    group = run("group", "show", "lab", "-o", "wide").stdout.splitlines()
    assert group[0] == "name: lab"
    assert any({"name", "uri"} <= set(line.split()) for line in group[1:]), group
    bad = run("device", "list", "-o", "xml")
    assert bad.exit_code == 2 and "xml" in bad.stderr


def test_rows_cells_and_the_format_read_from_argv() -> None:
    rows = rows_of({"deployment": "d1", "results": [{"device": "a", "findings": ["FA008"],
                                                     "error": {"code": "x"}}]})
    assert rows.columns == ["device", "findings", "error"] and rows.context == [
        ("deployment", "d1")]
    assert [cell_text(v) for v in rows.rows[0]] == ["a", "FA008", "code=x"]
    assert rows_of({"a": 1, "b": None}).rows == [[1, None]]
    assert cell_text([{"id": "FA008"}, {"id": "FA010"}]) == "FA008,FA010"
    assert requested_format(["device", "list", "--json"]) is OutputFormat.JSON
    assert requested_format(["x", "-o", "yaml"]) is OutputFormat.YAML
    assert requested_format(["x", "-otsv"]) is OutputFormat.TSV
    assert requested_format(["package", "m", "-o", "out.fpkg"]) is OutputFormat.TEXT
    assert requested_format(["x", "--", "--json"]) is OutputFormat.TEXT


def test_sizes_are_binary_units_and_nothing_in_the_cli_writes_decimal_ones() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 61_000, 5 << 20, 3 << 30, None)] == \
        ["0 B", "1023 B", "1.0 KiB", "59.6 KiB", "5.0 MiB", "3.0 GiB", "-"]
    # rich's decimal columns (kB, MB/s) are not used for sizes or rates
    for path in (REPO / "fleet").rglob("*.py"):
        text = Path(path).read_text()
        assert "TransferSpeedColumn" not in text, path
        assert "DownloadColumn(" not in text or "binary_units=True" in text, path
        assert "filesize.decimal" not in text, path
