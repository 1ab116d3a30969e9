"""Every error mnn-fleet raises, in one small module.

Two roots, as in python-tuf: ``FleetError`` for everything, and under it one family
per concern. Each class has a stable ``code`` (the agent protocol sends errors as data,
``{"code": ..., "message": ...}``, and the controller turns the code back into the
class with :func:`error_from_code`). Context lives in attributes, not in the message.

    FleetError
    ├── UsageError                  operator input the tool cannot act on
    │   ├── UriError
    │   │   ├── MalformedUriError
    │   │   └── UnknownSchemeError
    │   ├── NotFoundError           device / group / artifact / key not known
    │   ├── DuplicateError
    │   └── ModelError              model file is not usable (not MNN, conversion failed)
    │       ├── InvalidModelError
    │       └── ConversionError
    ├── RegistryError
    │   ├── SchemaTooNewError
    │   └── NotInitializedError
    ├── KeyMaterialError            controller / device key material missing or bad
    ├── TransportError              anything that moving bytes or commands can hit
    │   ├── ConnectError            cannot reach the device
    │   ├── HostKeyError
    │   │   ├── UnknownHostKeyError
    │   │   └── ChangedHostKeyError
    │   ├── AuthError               refused credentials / pair record / adb key
    │   ├── DeviceOfflineError
    │   ├── TransportTimeout
    │   ├── ConnectionLostError     dropped mid-operation (retryable)
    │   ├── RemoteFileError         path missing, permission, integrity after push
    │   ├── RemoteDiskFullError
    │   ├── AppNotInstalledError    iOS/Android app agent missing
    │   └── MailboxPendingError     request written, no answer within the deadline
    ├── PackageError                a package is refused (one class per attack)
    │   ├── FormatError             not a package / bad header / bad manifest JSON
    │   ├── UnsignedError
    │   ├── UntrustedSignerError
    │   ├── BadSignatureError       signed by the trusted key, content changed after
    │   ├── NotRecipientError
    │   ├── WrongKeyError           the wrapped key does not open with this device key
    │   ├── ChunkAuthError          a chunk fails AES-GCM authentication
    │   ├── ChunkOrderError         a chunk authenticates, but at another index
    │   ├── TruncatedPayloadError
    │   ├── TrailingDataError
    │   ├── SizeLimitError
    │   ├── DigestMismatchError
    │   ├── RollbackError           version older than installed
    │   ├── ReplayError             version equal to installed
    │   └── BaseMismatchError       LoRA bound to another base
    ├── DeviceError                 the device-side store or runtime
    │   ├── DiskFullError
    │   ├── StoreError
    │   ├── NoActiveModelError
    │   ├── HealthCheckError        no candidate produced correct outputs
    │   └── ReferenceMismatchError  LoRA / model outputs differ from references
    ├── AgentError                  the agent answered with an error code we do not know
    ├── RolloutError
    └── LabError                    the virtual lab could not be built or changed
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AgentError",
    "AppNotInstalledError",
    "AuthError",
    "BadSignatureError",
    "BaseMismatchError",
    "ChangedHostKeyError",
    "ChunkAuthError",
    "ChunkOrderError",
    "ConnectError",
    "ConnectionLostError",
    "ConversionError",
    "DeviceError",
    "DeviceOfflineError",
    "DigestMismatchError",
    "DiskFullError",
    "DuplicateError",
    "FleetError",
    "FormatError",
    "HealthCheckError",
    "HostKeyError",
    "InvalidModelError",
    "KeyMaterialError",
    "LabError",
    "MailboxPendingError",
    "MalformedUriError",
    "ModelError",
    "NoActiveModelError",
    "NotFoundError",
    "NotInitializedError",
    "NotRecipientError",
    "PackageError",
    "ReferenceMismatchError",
    "RegistryError",
    "RemoteDiskFullError",
    "RemoteFileError",
    "ReplayError",
    "RollbackError",
    "RolloutError",
    "SchemaTooNewError",
    "SizeLimitError",
    "StoreError",
    "TrailingDataError",
    "TransportError",
    "TransportTimeout",
    "TruncatedPayloadError",
    "UnknownHostKeyError",
    "UnknownSchemeError",
    "UnsignedError",
    "UntrustedSignerError",
    "UriError",
    "UsageError",
    "WrongKeyError",
    "error_from_code",
]


class FleetError(Exception):
    """Root of every mnn-fleet error. ``details`` carries machine-readable context."""

    code: ClassVar[str] = "fleet_error"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        """The error as data, the form the agent protocol sends."""
        return {"code": self.code, "type": type(self).__name__, "message": self.message,
                "details": self.details}


# -- operator input ---------------------------------------------------------------------
class UsageError(FleetError):
    code = "usage"


class UriError(UsageError):
    code = "uri"


class MalformedUriError(UriError):
    code = "malformed_uri"


class UnknownSchemeError(UriError):
    code = "unknown_scheme"


class NotFoundError(UsageError):
    code = "not_found"


class DuplicateError(UsageError):
    code = "duplicate"


class ModelError(UsageError):
    code = "model"


class InvalidModelError(ModelError):
    code = "invalid_model"


class ConversionError(ModelError):
    code = "conversion_failed"


# -- registry ---------------------------------------------------------------------------
class RegistryError(FleetError):
    code = "registry"


class SchemaTooNewError(RegistryError):
    code = "schema_too_new"


class NotInitializedError(RegistryError):
    code = "not_initialized"


class KeyMaterialError(FleetError):
    """A signing, device or ssh key is missing, unreadable or has loose permissions."""

    code = "key_material"


# -- transports -------------------------------------------------------------------------
class TransportError(FleetError):
    code = "transport"


class ConnectError(TransportError):
    code = "connect"
    retryable = True


class HostKeyError(TransportError):
    code = "host_key"


class UnknownHostKeyError(HostKeyError):
    code = "unknown_host_key"


class ChangedHostKeyError(HostKeyError):
    code = "changed_host_key"


class AuthError(TransportError):
    code = "auth"


class DeviceOfflineError(TransportError):
    code = "device_offline"
    retryable = True


class TransportTimeout(TransportError):
    code = "timeout"
    retryable = True


class ConnectionLostError(TransportError):
    code = "connection_lost"
    retryable = True


class RemoteFileError(TransportError):
    code = "remote_file"


class RemoteDiskFullError(TransportError):
    code = "remote_disk_full"


class AppNotInstalledError(TransportError):
    code = "app_not_installed"


class MailboxPendingError(TransportError):
    code = "mailbox_pending"


# -- packages ---------------------------------------------------------------------------
class PackageError(FleetError):
    code = "package"


class FormatError(PackageError):
    code = "format"


class UnsignedError(PackageError):
    code = "unsigned"


class UntrustedSignerError(PackageError):
    code = "untrusted_signer"


class BadSignatureError(PackageError):
    code = "bad_signature"


class NotRecipientError(PackageError):
    code = "not_recipient"


class WrongKeyError(PackageError):
    code = "wrong_key"


class ChunkAuthError(PackageError):
    code = "chunk_auth"


class ChunkOrderError(PackageError):
    code = "chunk_order"


class TruncatedPayloadError(PackageError):
    code = "truncated"


class TrailingDataError(PackageError):
    code = "trailing_data"


class SizeLimitError(PackageError):
    code = "size_limit"


class DigestMismatchError(PackageError):
    code = "digest_mismatch"


class RollbackError(PackageError):
    code = "rollback"


class ReplayError(PackageError):
    code = "replay"


class BaseMismatchError(PackageError):
    code = "base_mismatch"


# -- device side ------------------------------------------------------------------------
class DeviceError(FleetError):
    code = "device"


class DiskFullError(DeviceError):
    code = "disk_full"


class StoreError(DeviceError):
    code = "store"


class NoActiveModelError(DeviceError):
    code = "no_active_model"


class HealthCheckError(DeviceError):
    code = "health_check"


class ReferenceMismatchError(DeviceError):
    code = "reference_mismatch"


class AgentError(FleetError):
    """The agent reported an error whose code this controller does not know."""

    code = "agent"


class RolloutError(FleetError):
    code = "rollout"


class LabError(FleetError):
    """A lab command (ip netns, tc, nft, sshd) failed; ``details`` has the command."""

    code = "lab"


def _all_subclasses(cls: type[FleetError]) -> list[type[FleetError]]:
    out: list[type[FleetError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_from_code(code: str, message: str, details: dict[str, Any] | None = None
                    ) -> FleetError:
    """Rebuild the error an agent sent as data; unknown codes become :class:`AgentError`."""
    table = {c.code: c for c in _all_subclasses(FleetError)}
    cls = table.get(code, AgentError)
    err = cls(message, **(details or {}))
    if cls is AgentError:
        err.details.setdefault("remote_code", code)
    return err
