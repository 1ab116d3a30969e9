"""The controller's signing key file: 0600, never overwritten silently, refused when loose."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.artifacts import init_signing_key, load_signing_key
from fleet.core import errors
from fleet.core.package import fingerprint_public_key
from fleet.home import FleetHome


def test_init_makes_a_0600_key_even_with_a_permissive_umask(tmp_path: Path) -> None:
    home = FleetHome(tmp_path / "home")
    old = os.umask(0)
    try:
        info = init_signing_key(home)
    finally:
        os.umask(old)
    assert home.signing_key.stat().st_mode & 0o777 == 0o600
    key = load_signing_key(home)
    assert fingerprint_public_key(key.public_key()) == info.fingerprint
    assert "PRIVATE" not in info.public_key


def test_init_refuses_to_replace_without_force(tmp_path: Path) -> None:
    home = FleetHome(tmp_path / "home")
    first = init_signing_key(home)
    with pytest.raises(errors.DuplicateError):
        init_signing_key(home)
    assert fingerprint_public_key(load_signing_key(home).public_key()) == first.fingerprint
    assert init_signing_key(home, force=True).fingerprint != first.fingerprint


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_loose_permissions_are_refused(tmp_path: Path, mode: int) -> None:
    home = FleetHome(tmp_path / "home")
    init_signing_key(home)
    os.chmod(home.signing_key, mode)
    with pytest.raises(errors.KeyMaterialError) as info:
        load_signing_key(home)
    assert "chmod 600" in info.value.message


def test_missing_and_wrong_type_keys(tmp_path: Path) -> None:
    home = FleetHome(tmp_path / "home")
    with pytest.raises(errors.KeyMaterialError):
        load_signing_key(home)
    home.ensure()
    ec_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    fd = os.open(home.signing_key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, ec_key)
    os.close(fd)
    with pytest.raises(errors.KeyMaterialError):
        load_signing_key(home)
    home.signing_key.write_bytes(b"garbage")
    with pytest.raises(errors.KeyMaterialError):
        load_signing_key(home)
