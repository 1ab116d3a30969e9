"""Finding 10: validators use full matches (``$`` matches before a final newline), and
the iOS container-escape check can fire. One input per test, exact error class."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core import errors
from fleet.core.package import Manifest
from fleet.transports.ios import container_path
from fleet.transports.uri import parse_uri
from tests.package_kit import make_device, make_package


def test_name_with_a_trailing_newline_is_not_a_valid_name() -> None:
    assert Manifest.valid_name("onet") and not Manifest.valid_name("onet\n")


def test_signed_manifest_named_with_a_trailing_newline_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signer = ed25519.Ed25519PrivateKey.generate()
    dev = make_device(tmp_path / "dev", signer)
    import fleet.artifacts.build as build

    # a builder that does not check (the attacker's, or a bug): the device must refuse
    monkeypatch.setattr(build.Manifest, "valid_name", staticmethod(lambda _n: True))
    pkg, _ = make_package(tmp_path, signer, [dev], version=1, name="onet\n")
    monkeypatch.undo()
    before = dev.stored_files()
    with pytest.raises(errors.FormatError):
        dev.store().stage(pkg)
    assert dev.stored_files() == before and dev.store().installed() == {}


def test_manifest_digest_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    signer = ed25519.Ed25519PrivateKey.generate()
    dev = make_device(tmp_path / "dev", signer)
    _, m = make_package(tmp_path, signer, [dev], version=1)
    doc = m.to_dict()
    doc["payload"]["sha256"] += "\n"
    with pytest.raises(errors.FormatError):
        Manifest.from_dict(doc)


def test_uri_host_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(errors.UriError):
        parse_uri("local://board\n?root=/tmp/x")


@pytest.mark.parametrize("remote", ["Documents/../../etc/passwd", "../x", "a/..",
                                    "Documents/fleet/../../../private", "a\0b", ""])
def test_ios_paths_cannot_leave_the_container(remote: str) -> None:
    with pytest.raises(errors.RemoteFileError):
        container_path(remote)


def test_ios_paths_inside_the_container_are_kept() -> None:
    assert container_path("Documents/fleet/agent/x") == "/Documents/fleet/agent/x"
    assert container_path("/Documents/./a") == "/Documents/a"
