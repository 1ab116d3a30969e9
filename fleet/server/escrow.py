"""The server's escrow key: how a device that enrolls after a pull deployment was
packaged still gets the package.

A package's data key reaches each device in its own key envelope (``docs/package-format.md``,
format 2), sealed when the package is built, for the devices enrolled then. Pull devices
enroll whenever they first call home, usually after the operator deployed. So every
package made for pull mode also lists one more recipient: this P-256 key
(``$FLEET_HOME/keys/pull_escrow_key.pem``, 0600, made on first use). With it the server
opens its own envelope, checks the key against the manifest's commitment, and seals a
fresh 181-byte envelope for the late device's key (:func:`envelope_for_device`). The
package file, its signature and every byte a device downloads stay the same.

What it costs: whoever holds the controller home can open pull packages. The controller
had the plaintext anyway (it built them); the key never leaves the home.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleet.core import errors
from fleet.core.package import Recipient, bundle_path, find_envelope
from fleet.core.package.canonical import parse_canonical
from fleet.core.package.envelope import (
    Envelope,
    check_envelope,
    envelope_to_text,
    open_envelope,
    seal_envelope,
)
from fleet.core.package.keyid import fingerprint_public_key
from fleet.core.package.layout import parse_header, read_header_bytes
from fleet.core.package.manifest import Manifest
from fleet.home import FleetHome
from fleet.registry.models import Device

__all__ = ["ESCROW_NAME", "envelope_for_device", "escrow_device", "escrow_key"]

ESCROW_NAME = "fleet-server-escrow"


def _path(home: FleetHome) -> Path:
    return home.keys_dir / "pull_escrow_key.pem"


def escrow_key(home: FleetHome) -> ec.EllipticCurvePrivateKey:
    """The escrow key, made on first use (O_EXCL: concurrent first uses agree)."""
    path = _path(home)
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
                f.flush()
                os.fsync(f.fileno())
    if path.stat().st_mode & 0o077:
        raise errors.KeyMaterialError(f"escrow key {path} is readable by others; chmod 600",
                                      path=str(path))
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise errors.KeyMaterialError(f"escrow key {path} is not a P-256 key", path=str(path))
    return loaded


def escrow_device(home: FleetHome) -> Device:
    """The escrow key as a package recipient (a Device row that is never stored)."""
    pub = escrow_key(home).public_key()
    pem = pub.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return Device(id=uuid.UUID(int=0), name=ESCROW_NAME, platform="linux",
                  uri="pull://" + ESCROW_NAME, public_key=pem,
                  fingerprint=fingerprint_public_key(pub))


def _manifest(package: Path) -> Manifest:
    with package.open("rb") as f:
        raw = read_header_bytes(f)
    # the signature was checked when the package was built or imported (and every
    # device checks it again): the server only reads the manifest
    return Manifest.from_dict(parse_canonical(parse_header(raw).manifest_bytes))


def envelope_for_device(home: FleetHome, package: Path, device: Device) -> str | None:
    """This device's key envelope (base64) for ``package``: from the bundle when the
    package was built for it, else sealed now from the escrow envelope. None for a
    format-1 package (keys inline). NotRecipientError when neither is possible (a package
    built without the escrow key, e.g. a ready ``.fpkg``)."""
    if not device.fingerprint or not device.public_key:
        raise errors.KeyMaterialError(f"device {device.name} is not enrolled",
                                      device=device.name)
    m = _manifest(package)
    if not m.uses_envelopes:
        if device.fingerprint not in m.recipients:
            raise _not_for(package, device)
        return None
    bundle = bundle_path(package)
    found = find_envelope(bundle, device.fingerprint)
    if found is not None:
        return envelope_to_text(found)
    key = escrow_key(home)
    mine = find_envelope(bundle, fingerprint_public_key(key.public_key()))
    if mine is None:
        raise _not_for(package, device)
    env = check_envelope(mine, m, fingerprint_public_key(key.public_key()))
    data_key = open_envelope(env, key, m)  # checks the manifest's key commitment
    sealed: Envelope = seal_envelope(data_key, Recipient.from_pem(
        device.public_key, name=device.name, fingerprint=device.fingerprint),
        m.content_digest())
    return envelope_to_text(sealed.to_bytes())


def _not_for(package: Path, device: Device) -> errors.NotRecipientError:
    return errors.NotRecipientError(
        f"{device.name}: package {package.name} was not made for this device and carries "
        "no escrow envelope; deploy the model (not a ready .fpkg) in pull mode",
        device=device.name)
