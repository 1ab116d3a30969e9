"""Process hardening the agent applies to itself at start (ARCHITECTURE "Device store":
plaintext only in memory, no core dumps).

- No core dumps: the agent and the serve daemon hold decrypted model bytes in memory
  (memfds, MNN's buffers); a crash must not write them to disk, whatever ``ulimit -c`` or
  ``core_pattern`` the system has. ``RLIMIT_CORE`` goes to 0 (soft and hard, so a child
  cannot raise it back) and the process is marked not dumpable (``PR_SET_DUMPABLE`` 0,
  which also keeps other processes of the same user from ptrace-reading its memory).
- A private umask (077): every file and folder the agent creates in its root is its own,
  whatever umask the caller had (``umask 000`` made ``store/`` world-writable).

Best effort where the platform lacks a piece (no ``prctl`` off Linux): the facts come back
from :func:`harden_process` so a report can say what holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import sys
from typing import Any

__all__ = ["PRIVATE_UMASK", "disable_core_dumps", "harden_process"]

PRIVATE_UMASK = 0o077
_PR_SET_DUMPABLE = 4


def disable_core_dumps() -> dict[str, Any]:
    """``RLIMIT_CORE`` (0, 0) and not dumpable; returns what was done."""
    facts: dict[str, Any] = {"rlimit_core": None, "dumpable": None}
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(ValueError, OSError):
        facts["rlimit_core"] = list(resource.getrlimit(resource.RLIMIT_CORE))
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError, TypeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
                facts["dumpable"] = False
    return facts


def harden_process() -> dict[str, Any]:
    """Everything above, once per process (idempotent)."""
    os.umask(PRIVATE_UMASK)
    return {**disable_core_dumps(), "umask": oct(PRIVATE_UMASK)}
