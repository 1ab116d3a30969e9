"""Size caps and the clock tolerance in one place (python-tuf keeps its limits in one
config dataclass too).

A device checks every signed size against these before it reads a byte of payload, so a
package cannot make it read, allocate or store more than the operator allows."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_CHUNK_SIZE", "Limits"]

#: the payload's AES-GCM chunk size unless a package says otherwise (1 MiB)
DEFAULT_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class Limits:
    max_manifest_bytes: int = 1 << 20
    max_payload_bytes: int = 16 << 30
    max_files: int = 4096
    min_chunk_size: int = 4096
    max_chunk_size: int = 16 << 20
    #: slack when a device compares a signed ``expires`` with its own clock (seconds):
    #: devices without NTP drift; an hour is small against 90 days (packages) or one day
    #: (rollback orders), and the same bound says when two clocks are "far apart"
    clock_tolerance_s: int = 3600
