"""A device's status, decided from its last contact and that contact's error class.

Pure: no I/O, no clock. :meth:`fleet.registry.api.Registry.record_contact` is the one
writer of ``devices.status``; every command that talks to a device (deploy, audit, enroll,
resume) reports the outcome of each contact there, and this module decides what it means:

=====================================================  ================  ==============
last contact                                           status            answered
=====================================================  ================  ==============
went well; or the device refused a package (a          ``ok``            yes
PackageError), failed a model's health check (it keeps
its previous model), was busy, or has no active model
disk or quota full (DiskFullError, RemoteDiskFull)     ``degraded``      yes
could not connect, dropped, timed out, auth/host key   ``unreachable``   no
the agent is missing or broken (unknown agent error,   ``failed``        yes
store error, app not installed, remote file error)
not a contact (registry, usage, plan, cancelled)       unchanged         --
=====================================================  ================  ==============

A device that was never answered keeps ``registered``/``enrolled`` until it is.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from fleet.core import errors

__all__ = ["DeviceState", "answered", "device_status", "says_about_device"]


class DeviceState(StrEnum):
    """``devices.status``: what the controller knows of a device from its last contact."""

    REGISTERED = "registered"  #: known, no key yet
    ENROLLED = "enrolled"  #: has a key, no contact since
    OK = "ok"  #: reachable: the last contact went well
    DEGRADED = "degraded"  #: reachable, but cannot take work as it is (disk full, health)
    FAILED = "failed"  #: reachable, but its agent is missing or broken
    UNREACHABLE = "unreachable"  #: the last contact did not get through


#: most specific first: RemoteDiskFullError is a TransportError, BusyError a DeviceError
_TABLE: tuple[tuple[type[BaseException], DeviceState], ...] = (
    (errors.DiskFullError, DeviceState.DEGRADED),
    (errors.RemoteDiskFullError, DeviceState.DEGRADED),
    (errors.HealthCheckError, DeviceState.OK),
    (errors.ReferenceMismatchError, DeviceState.OK),
    (errors.BusyError, DeviceState.OK),
    (errors.NoActiveModelError, DeviceState.OK),
    (errors.PackageError, DeviceState.OK),
    (errors.AppNotInstalledError, DeviceState.FAILED),
    (errors.RemoteFileError, DeviceState.FAILED),
    (errors.MailboxPendingError, DeviceState.UNREACHABLE),
    (errors.TransportError, DeviceState.UNREACHABLE),
    (errors.DeviceError, DeviceState.FAILED),
    (errors.AgentError, DeviceState.FAILED),
)


def _lookup(error_class: type[BaseException]) -> DeviceState | None:
    for cls, state in _TABLE:
        if issubclass(error_class, cls):
            return state
    return None


def says_about_device(error_class: type[BaseException] | None) -> bool:
    """Whether a contact that ended with ``error_class`` tells anything of the device
    (None, a transport, device, agent or package error) rather than of the controller."""
    return error_class is None or _lookup(error_class) is not None


def answered(error_class: type[BaseException] | None) -> bool:
    """Whether a contact that ended with ``error_class`` (None: no error) heard the
    device, so its ``last_seen`` moves."""
    if error_class is None:
        return True
    state = _lookup(error_class)
    return state is not None and state is not DeviceState.UNREACHABLE


def device_status(last_error_class: type[BaseException] | None, last_seen: datetime | None,
                  *, previous: DeviceState | str) -> DeviceState:
    """The device's status after a contact that ended with ``last_error_class`` (None: it
    went well); ``last_seen`` is when the device last answered (after this contact),
    ``previous`` its status before. An error that says nothing about the device (registry,
    usage, plan, cancelled) leaves ``previous``."""
    try:
        prev = DeviceState(previous)
    except ValueError:  # a status this code does not know: decide afresh
        prev = DeviceState.REGISTERED
    if last_error_class is None:
        if last_seen is None:  # nothing heard yet: keep registered/enrolled
            return prev
        return DeviceState.OK
    state = _lookup(last_error_class)
    return prev if state is None else state
