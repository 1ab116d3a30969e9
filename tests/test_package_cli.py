"""``fleet keys`` and ``fleet package`` end to end: a package made by the CLI opens on an
enrolled device and on no other."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fleet_agent.identity import public_pem

from fleet.artifacts import load_signing_key, read_manifest
from fleet.core import errors
from fleet.core.package.bundle import bundle_fingerprints, bundle_path
from fleet.home import FleetHome
from fleet.registry import Registry
from tests.package_kit import make_device, make_tiny_mnn


def _enrolled(tmp_path: Path, home: FleetHome, reg: Registry, name: str,
              group: str | None = None):  # type: ignore[no-untyped-def]
    d = make_device(tmp_path / name, load_signing_key(home))
    pem, fp = public_pem(d.key)
    reg.add_device(name, f"local://{name}?root={d.ctx.root}", public_key=pem, fingerprint=fp,
                   groups=[group] if group else ())
    return d


def test_keys_init_show_and_refusals(run_fleet, home: FleetHome) -> None:  # type: ignore[no-untyped-def]
    r = run_fleet("keys", "show", "--json")
    assert r.exit_code == 11 and "fleet keys init" in r.stderr  # KeyMaterialError
    r = run_fleet("keys", "init", "--json")
    assert r.exit_code == 0, r.output
    made = json.loads(r.stdout)
    assert made["fingerprint"].startswith("SHA256:")
    assert oct(home.signing_key.stat().st_mode & 0o777) == oct(0o600)
    shown = json.loads(run_fleet("keys", "show", "--json").stdout)
    assert (shown["fingerprint"], shown["public_key"]) == (made["fingerprint"],
                                                           made["public_key"])
    r = run_fleet("keys", "init")
    assert r.exit_code == 6 and "--force" in r.stderr  # DuplicateError: key kept
    assert json.loads(run_fleet("keys", "show", "--json").stdout)["fingerprint"] \
        == made["fingerprint"]
    os.chmod(home.signing_key, 0o644)
    r = run_fleet("keys", "show")
    assert r.exit_code == 11 and "chmod 600" in r.stderr
    os.chmod(home.signing_key, 0o600)
    r = run_fleet("keys", "init", "--force", "--yes", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["fingerprint"] != made["fingerprint"]


def test_package_for_a_group_opens_on_members_only(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    assert run_fleet("init").exit_code == 0
    assert run_fleet("keys", "init").exit_code == 0
    reg = Registry.open(home)
    reg.ensure_group("phones")
    a = _enrolled(tmp_path, home, reg, "a", "phones")
    b = _enrolled(tmp_path, home, reg, "b", "phones")
    c = _enrolled(tmp_path, home, reg, "c")
    model = make_tiny_mnn(tmp_path / "tiny.mnn")
    out = tmp_path / "tiny.fpkg"
    r = run_fleet("package", str(model), "--for", "phones", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output + r.stderr
    doc = json.loads(r.stdout)
    assert doc["version"] == 1 and {x["device"] for x in doc["recipients"]} == {"a", "b"}
    assert doc["mnn"]["inputs"][0]["shape"] == [1, 3, 4, 4]
    m = read_manifest(out, load_signing_key(home).public_key())
    assert m.entry == "tiny.mnn" and m.chunk_size == 1 << 20
    for d in (a, b):
        st = d.store()
        st.stage(out)
        st.activate("tiny", 1)
        with st.open_payload("tiny") as opened:
            assert Path(opened.entry).read_bytes() == model.read_bytes()
    with pytest.raises(errors.NotRecipientError):
        c.store().stage(out)
    # The same payload for other devices is the same version (issue 12: the same source
    # and options give the same version), in a new package for exactly those devices.
    r = run_fleet("package", str(model), "--for", "c", "--for", "a", "-o",
                  str(tmp_path / "v1c.fpkg"), "--json")
    assert r.exit_code == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["version"] == 1 and again["reused"] is False
    assert set(bundle_fingerprints(bundle_path(tmp_path / "v1c.fpkg"))) == {
        d.recipient.fingerprint for d in (a, c)}  # the key envelopes came with -o
    # The registry recorded it, so a changed model of this name is version 2.
    make_tiny_mnn(model, seed=1)
    r = run_fleet("package", str(model), "--for", "a", "-o", str(tmp_path / "v2.fpkg"),
                  "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["version"] == 2
    reg.close()


def test_package_refuses_a_renamed_non_mnn_file(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                                tmp_path: Path) -> None:
    run_fleet("init")
    run_fleet("keys", "init")
    reg = Registry.open(home)
    _enrolled(tmp_path, home, reg, "a")
    reg.close()
    fake = tmp_path / "model.mnn"
    fake.write_bytes(b"\x7fELF" + os.urandom(4000))
    out = tmp_path / "x.fpkg"
    r = run_fleet("package", str(fake), "--for", "a", "-o", str(out))
    assert r.exit_code == 9 and "not a loadable MNN model" in r.stderr  # InvalidModelError
    assert not out.exists()


def test_package_for_unknown_or_unenrolled_targets(run_fleet, home: FleetHome,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    run_fleet("init")
    run_fleet("keys", "init")
    reg = Registry.open(home)
    reg.add_device("raw", f"local://raw?root={tmp_path / 'raw'}")  # never enrolled
    reg.close()
    model = make_tiny_mnn(tmp_path / "tiny.mnn")
    r = run_fleet("package", str(model), "--for", "nobody", "-o", str(tmp_path / "o.fpkg"))
    assert r.exit_code == 5  # NotFoundError
    r = run_fleet("package", str(model), "--for", "raw", "-o", str(tmp_path / "o.fpkg"))
    assert r.exit_code == 11 and "not enrolled" in r.stderr
