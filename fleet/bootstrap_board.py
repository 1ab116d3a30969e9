"""What a board's Python is, asked over its transport: the facts a wheelhouse must match.

``fleet device bootstrap`` installs wheels with native parts (MNN, numpy, cryptography, the
runtime's ``_native`` module and ``fleet-probe``), so it needs the board's machine
(``aarch64``), CPython version and ABI flags, extension suffix and C library (manylinux
wheels need a glibc at least as new as their tag says). :func:`ask_board` runs one
``python3 -c`` on the board (stdlib only) and returns a :class:`BoardPlatform`;
:func:`controller_platform` is the same for the Python running the controller, so the two
compare field by field.
"""

from __future__ import annotations

import json
import platform
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.core import errors
from fleet.transports.base import Transport

__all__ = ["ABI_VARS", "BoardPlatform", "ask_board", "controller_platform"]

#: ``sysconfig`` variables that decide whether an extension compiled against one
#: interpreter's headers loads in another of the same version (pyconfig.h's ABI facts).
ABI_VARS = ("SIZEOF_VOID_P", "SIZEOF_LONG", "SIZEOF_SIZE_T", "SIZEOF_INT", "SIZEOF_WCHAR_T",
            "Py_DEBUG", "Py_TRACE_REFS", "WITH_PYMALLOC", "Py_GIL_DISABLED")

_SCRIPT = r"""
import json, platform, sys, sysconfig
v = sysconfig.get_config_vars()
print(json.dumps({
  "machine": platform.machine(), "implementation": sys.implementation.name,
  "python": list(sys.version_info[:3]), "abiflags": getattr(sys, "abiflags", ""),
  "soabi": v.get("SOABI") or "", "ext_suffix": v.get("EXT_SUFFIX") or "",
  "libc": list(platform.libc_ver()), "byteorder": sys.byteorder,
  "abi_vars": {k: v.get(k) for k in %s},
}))
"""


@dataclass(frozen=True)
class BoardPlatform:
    """One CPython on one Linux machine, as far as wheels care."""

    machine: str  #: ``platform.machine()``: ``aarch64``, ``x86_64``
    implementation: str  #: ``cpython``
    python: tuple[int, int, int]
    abiflags: str  #: ``sys.abiflags`` (``""``; ``"t"`` for free-threaded builds)
    soabi: str  #: ``cpython-311-aarch64-linux-gnu``
    ext_suffix: str  #: ``.cpython-311-aarch64-linux-gnu.so``
    libc: str  #: ``glibc`` (``""`` when Python could not tell: musl, static builds)
    libc_version: tuple[int, int]  #: ``(2, 36)``; ``(0, 0)`` unknown
    byteorder: str = "little"
    abi_vars: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        """``cp311-aarch64``: what a wheelhouse is made for (compare ``Wheelhouse.tag``)."""
        return f"cp{self.python[0]}{self.python[1]}{self.abiflags}-{self.machine}"

    @property
    def python_tag(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}"

    @property
    def abi_tag(self) -> str:
        return f"cp{self.python[0]}{self.python[1]}{self.abiflags}"

    def pip_platforms(self) -> list[str]:
        """Every manylinux tag this board installs, newest first (pip does not widen one
        ``--platform`` to the older glibc versions by itself)."""
        major, minor = self.libc_version
        if self.libc != "glibc" or major != 2:
            raise errors.UsageError(
                f"the board's C library is {self.libc or 'unknown'} "
                f"{'.'.join(map(str, self.libc_version))}: manylinux wheels need glibc; "
                "pass a ready --wheelhouse DIR built for it")
        tags = [f"manylinux_2_{m}_{self.machine}" for m in range(minor, 16, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{name}_{self.machine}" for m, name in legacy.items() if m <= minor]
        return tags

    def describe(self) -> str:
        return (f"CPython {'.'.join(map(str, self.python))}{self.abiflags} on "
                f"{self.machine}, {self.libc} {'.'.join(map(str, self.libc_version))}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tag": self.tag}

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> BoardPlatform:
        libc, version = [*list(doc.get("libc") or []), "", ""][:2]
        parts = [int(p) for p in str(version).split(".")[:2] if p.isdigit()]
        return cls(machine=str(doc["machine"]), implementation=str(doc["implementation"]),
                   python=tuple(int(x) for x in doc["python"][:3]),  # type: ignore[arg-type]
                   abiflags=str(doc.get("abiflags") or ""), soabi=str(doc.get("soabi") or ""),
                   ext_suffix=str(doc.get("ext_suffix") or ""), libc=str(libc),
                   libc_version=(*parts, 0, 0)[:2],  # type: ignore[arg-type]
                   byteorder=str(doc.get("byteorder") or "little"),
                   abi_vars=dict(doc.get("abi_vars") or {}))


def _script() -> str:
    return _SCRIPT % (repr(list(ABI_VARS)),)


def controller_platform() -> BoardPlatform:
    """The Python running this controller, described like a board."""
    v = sysconfig.get_config_vars()
    return BoardPlatform.from_doc({
        "machine": platform.machine(), "implementation": sys.implementation.name,
        "python": list(sys.version_info[:3]), "abiflags": getattr(sys, "abiflags", ""),
        "soabi": v.get("SOABI") or "", "ext_suffix": v.get("EXT_SUFFIX") or "",
        "libc": list(platform.libc_ver()), "byteorder": sys.byteorder,
        "abi_vars": {k: v.get(k) for k in ABI_VARS}})


def ask_board(t: Transport, python: str = "python3", *, device: str = "device"
              ) -> BoardPlatform:
    """Run the stdlib-only script with the board's ``python``; its answer.

    Raises :class:`RemoteFileError` when the board's Python does not run, and
    :class:`UsageError` when it is not CPython (the agent's wheels are CPython ones).
    """
    res = t.run([python, "-c", _script()], timeout=120)
    text = res.stdout.decode(errors="replace").strip()
    if not res.ok or not text:
        raise errors.RemoteFileError(
            f"{device}: {python} did not answer ({res.exit_code}): "
            f"{(res.stderr or res.stdout).decode(errors='replace').strip()[-500:]}",
            device=device, exit_code=res.exit_code)
    try:
        board = BoardPlatform.from_doc(json.loads(text.splitlines()[-1]))
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.RemoteFileError(f"{device}: unreadable answer from {python}: "
                                     f"{text[-300:]}", device=device) from exc
    if board.implementation != "cpython":
        raise errors.UsageError(f"{device} runs {board.implementation}, not CPython: the "
                                "agent's native wheels are CPython ones", device=device)
    return board
