"""The virtual device lab: devices that speak the real protocols, on this machine.

Kinds: ``iot`` (OpenSSH sshd in network namespaces, :mod:`fleet.lab.iot`), ``android``
and ``ios`` (emulated adbd / usbmuxd, their own modules). Each kind module exposes
``up(home, count, *, start_index=0)``, ``down(home)`` and ``status(home)``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from fleet.core import errors
from fleet.lab.base import LabDevice

__all__ = ["KINDS", "LabDevice", "installed_kinds", "kind_module"]

#: kind -> module implementing up/down/status
KINDS = {"iot": "fleet.lab.iot", "android": "fleet.lab.android", "ios": "fleet.lab.ios"}


def kind_module(kind: str) -> ModuleType:
    """Import a lab kind lazily; a missing module is a clear error, not a traceback."""
    if kind not in KINDS:
        raise errors.UsageError(f"unknown lab kind {kind!r}; known: {', '.join(KINDS)}")
    try:
        return importlib.import_module(KINDS[kind])
    except ModuleNotFoundError as exc:
        if exc.name != KINDS[kind]:
            raise
        raise errors.LabError(f"the {kind} lab ({KINDS[kind]}) is not part of this build",
                              kind=kind) from exc


def installed_kinds() -> list[str]:
    """Kinds whose module exists (``down``/``status`` visit only these)."""
    import importlib.util
    return [k for k, m in KINDS.items() if importlib.util.find_spec(m) is not None]
