"""Controller side of packages: build and sign, keys, conversion, reference outputs.

:func:`build_package`, :func:`read_manifest`, :mod:`.keys`, :mod:`.mnninfo`,
:mod:`.convert`, :mod:`.reference`. What the device needs to read, verify and decrypt a
package is in :mod:`fleet.core.package`. Format and threats: ``docs/package-format.md``.
"""

from __future__ import annotations

from fleet.artifacts.build import base_binding, build_package, read_manifest
from fleet.artifacts.keys import SigningKeyInfo, init_signing_key, load_signing_key

__all__ = [
    "SigningKeyInfo",
    "base_binding",
    "build_package",
    "init_signing_key",
    "load_signing_key",
    "read_manifest",
]
