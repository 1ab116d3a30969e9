"""Controller side of key envelopes: which device gets which 181 bytes, and keeping a
package and its envelope bundle together on disk.

A format-2 package (``docs/package-format.md``) is one file for every recipient; its
per-device key envelopes live in the bundle ``PACKAGE.fpkg.envelopes`` beside it. A push
sends the package file and, with the ``stage`` (or ``lora add``) request, only the
device's own envelope: :func:`envelope_for`. Copying, moving and deleting a package goes
through :func:`copy_package` / :func:`move_package` / :func:`remove_package` so the two
files never part. A format-1 package (every wrapped key in its manifest) has no bundle.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Any

from fleet.core import errors
from fleet.core.package.bundle import bundle_fingerprints, bundle_path, find_envelope
from fleet.core.package.layout import FORMAT_VERSION, MAGIC

__all__ = ["copy_package", "envelope_for", "move_package", "package_format",
           "package_recipients", "remove_package"]


def package_format(package: str | os.PathLike[str]) -> int | None:
    """The format version in a package's first bytes (1 inline wraps, 2 envelopes), or
    None for a file that does not start like a package (the device refuses it)."""
    with open(package, "rb") as f:
        head = f.read(10)
    if len(head) != 10 or head[:8] != MAGIC:
        return None
    return int(struct.unpack(">H", head[8:10])[0])


def envelope_for(package: str | os.PathLike[str], fingerprint: str | None,
                 device: str) -> bytes | None:
    """The envelope to send ``device`` (key ``fingerprint``) with ``package``: None unless
    it is a format-2 package (format 1 needs none; anything else the device refuses);
    NotRecipientError when the bundle has none for this key, and MissingEnvelopeError when
    the bundle is gone: raised before anything is pushed."""
    if package_format(package) != FORMAT_VERSION:
        return None
    bundle = bundle_path(package)
    if not bundle.is_file():
        raise errors.MissingEnvelopeError(
            f"{device}: the key envelopes of {Path(package).name} are missing ({bundle.name} "
            "should lie beside it); package the model again", device=device,
            bundle=str(bundle))
    env = find_envelope(bundle, fingerprint) if fingerprint else None
    if env is None:
        raise errors.NotRecipientError(
            f"{device}: package {Path(package).name} was not made for this device's key; "
            "package the model again for it", device=device, fingerprint=fingerprint)
    return env


def package_recipients(package: str | os.PathLike[str], manifest: dict[str, Any]
                       ) -> set[str] | None:
    """Fingerprints a package can reach: its bundle's (format 2) or its manifest's
    ``recipients`` (format 1); None when a format-2 package has lost its bundle."""
    if manifest.get("recipients") is not None:
        return set(manifest["recipients"])
    bundle = bundle_path(package)
    if not bundle.is_file():
        return None
    return set(bundle_fingerprints(bundle))


def copy_package(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a package and its bundle (if any) to ``dst`` (temp names, then renames: the
    bundle first); a stale bundle at the destination goes when the source has none."""
    src, dst = Path(src), Path(dst)
    sb, db = bundle_path(src), bundle_path(dst)
    if sb.is_file():
        tmp = db.with_name(f".{db.name}.tmp")
        shutil.copyfile(sb, tmp)
        tmp.replace(db)
    else:
        db.unlink(missing_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def move_package(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move a package and its bundle (if any) to ``dst``; the bundle moves first."""
    sb = bundle_path(src)
    if sb.is_file():
        shutil.move(str(sb), str(bundle_path(dst)))
    shutil.move(str(src), str(dst))


def remove_package(path: str | os.PathLike[str]) -> None:
    """Delete a package and its bundle; missing files are fine."""
    Path(path).unlink(missing_ok=True)
    bundle_path(path).unlink(missing_ok=True)
