"""The controller's Ed25519 keys: 0600 PEM files in ``$FLEET_HOME/keys``.

``signing_key.pem`` is the online key (manifests, rollback orders); ``root_key.pem`` the
offline root key that signs root documents only (:mod:`fleet.artifacts.trust`).

Never in the registry (which only ever sees the public part and its fingerprint). A key
file that group or others can read is refused rather than used: a leaked signing key lets
anyone ship models to every device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fleet.core import errors
from fleet.core.package.keyid import fingerprint_public_key
from fleet.home import FleetHome

__all__ = ["SigningKeyInfo", "init_signing_key", "key_info", "load_signing_key", "public_pem",
           "write_private_key"]


@dataclass(frozen=True)
class SigningKeyInfo:
    path: str
    public_key: str  # PEM
    fingerprint: str
    algorithm: str = "ed25519"


def public_pem(key: ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_info(path: Path, key: ed25519.Ed25519PrivateKey) -> SigningKeyInfo:
    pub = key.public_key()
    return SigningKeyInfo(str(path), public_pem(pub), fingerprint_public_key(pub))


def write_private_key(path: Path, key: ed25519.Ed25519PrivateKey) -> None:
    """``key`` as a 0600 PKCS#8 PEM at ``path`` (temp file + fsync + rename)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask and ignored if it existed
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def init_signing_key(home: FleetHome, *, force: bool = False) -> SigningKeyInfo:
    """Make the signing key; refuses to replace an existing one unless ``force``.

    Replacing it orphans every enrolled device (they pin the old public key)."""
    path = home.signing_key
    if path.exists() and not force:
        raise errors.DuplicateError(
            f"a signing key already exists at {path}; devices trust it. Use --force to "
            "replace it (every device must then be re-enrolled)", path=str(path))
    home.ensure()
    key = ed25519.Ed25519PrivateKey.generate()
    write_private_key(path, key)
    return key_info(path, key)


def load_signing_key(home_or_path: FleetHome | Path) -> ed25519.Ed25519PrivateKey:
    path = home_or_path.signing_key if isinstance(home_or_path, FleetHome) else home_or_path
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise errors.KeyMaterialError(
            f"no signing key at {path}; run `fleet keys init`", path=str(path)) from exc
    mode = st.st_mode & 0o777
    if mode & 0o077:
        raise errors.KeyMaterialError(
            f"signing key {path} is accessible by others (mode {mode:o}); chmod 600 it",
            path=str(path), mode=oct(mode))
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise errors.KeyMaterialError(f"signing key {path} is unreadable",
                                      path=str(path)) from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise errors.KeyMaterialError(f"signing key {path} is not an Ed25519 key",
                                      path=str(path))
    return key
