"""Every error mnn-fleet raises, in one small module.

One root, ``FleetError``, for everything; under it one family per concern, and a few
classes that stand alone (``KeyMaterialError``, ``AgentError``, ``PartialFailureError``,
``LabError``). Each class has a stable ``code`` (the agent protocol sends errors as data,
``{"code": ..., "message": ...}``, and the controller turns the code back into the
class with :func:`error_from_code`). Context lives in attributes, not in the message.

    FleetError
    ├── UsageError                  operator input the tool cannot act on
    │   ├── UriError
    │   │   ├── MalformedUriError
    │   │   └── UnknownSchemeError
    │   ├── RequestLimitError       a serve request past a bound (prompt, ids, connections)
    │   ├── NotFoundError           device / group / artifact / key not known
    │   ├── NoTargetsError          the targets (-g/-d/-l) select no device
    │   ├── DuplicateError
    │   └── ModelError              model file is not usable (not MNN, conversion failed)
    │       ├── InvalidModelError
    │       │   └── UnsafeFileError a link / non-regular / outside / oversized input file
    │       └── ConversionError
    ├── RegistryError               the registry cannot be used (exit code of its own)
    │   ├── SchemaTooNewError
    │   ├── NotInitializedError
    │   ├── RegistryReadOnlyError   its storage refuses writes (read-only mount, permissions)
    │   ├── RegistryFullError       its disk or quota is full (registry or package cache)
    │   ├── RegistryBusyError       another writer held the lock past the wait (retryable)
    │   └── RegistryIOError         the storage failed a read or write (disk I/O error)
    ├── KeyMaterialError            controller / device key material missing or bad
    │   └── RevokedError            a device (key) the operator revoked: nothing is made for it
    ├── TransportError              anything that moving bytes or commands can hit
    │   ├── ConnectError            cannot reach the device
    │   ├── HostKeyError
    │   │   ├── UnknownHostKeyError
    │   │   └── ChangedHostKeyError
    │   ├── AuthError               refused credentials / pair record / adb key
    │   │   └── MailboxAuthError    a mailbox request or answer fails authentication
    │   │       ├── MailboxUnsignedError       no signature
    │   │       ├── MailboxBadSignatureError   not signed by the key it must be signed by
    │   │       ├── MailboxReplayError         request nonce already seen in its window
    │   │       ├── MailboxExpiredError        past its expiry, or expiry too far ahead
    │   │       ├── MailboxMisaddressedError   request for another device's key
    │   │       ├── MailboxUnboundAnswerError  answer bound to another request
    │   │       ├── MailboxMalformedError      a field missing or of the wrong type
    │   │       └── MailboxForbiddenError      a verb or argument the mailbox never runs
    │   │   └── ServerAuthError     the fleet server refused a device's credentials (pull)
    │   │       └── EnrollTokenError  enrollment token unknown, used or expired
    │   ├── RateLimitedError        the fleet server asks the device to slow down (retryable)
    │   ├── DeviceOfflineError
    │   ├── TransportTimeout
    │   ├── ConnectionLostError     dropped mid-operation (retryable)
    │   ├── RemoteFileError         path missing, permission, integrity after push
    │   ├── OutputLimitError        a device printed more than the controller reads
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
    │   ├── EnvelopeError           a per-device key envelope (format 2) is refused
    │   │   ├── MissingEnvelopeError   a format-2 package came without its envelope
    │   │   ├── EnvelopeFormatError    truncated, bad magic/version, not a P-256 point
    │   │   ├── EnvelopeMismatchError  the envelope belongs to another package
    │   │   └── KeyCommitmentError     it opens, to a data key the manifest does not
    │   │                              commit to (forged with someone else's key)
    │   ├── ChunkAuthError          a chunk fails AES-GCM authentication
    │   ├── ChunkOrderError         a chunk authenticates, but at another index
    │   ├── TruncatedPayloadError
    │   ├── TrailingDataError
    │   ├── SizeLimitError
    │   ├── DigestMismatchError
    │   ├── RollbackError           version older than installed
    │   ├── ReplayError             version equal to installed
    │   ├── BaseMismatchError       LoRA bound to another base
    │   ├── ExpiredError            a manifest or rollback order past its ``expires``
    │   ├── ClockSkewError          refused as expired because the device clock is far
    │   │                           from the controller's (both clocks in the details)
    │   └── TrustChainError         a root of trust update that does not chain (threshold
    │                               of the old and the new root, version + 1), or a trust
    │                               change without one (``replace_trust``)
    ├── DeviceError                 the device-side store or runtime
    │   ├── DiskFullError           ENOSPC/EDQUOT on the device (never a transport error)
    │   ├── BusyError               another operation holds the device root's lock
    │   │                           past the wait (retryable)
    │   ├── StoreError
    │   │   └── UnsafeRootError     the device root has links / foreign or loose folders
    │   ├── NoActiveModelError
    │   ├── HealthCheckError        no candidate produced correct outputs
    │   └── ReferenceMismatchError  LoRA / model outputs differ from references
    ├── AgentError                  the agent answered with an error code we do not know
    ├── RolloutError                a rollout cannot go on as asked
    │   ├── PlanError               the plan refuses a device (it runs a newer or a
    │   │                           different build of the version): not an attack
    │   └── RolloutCancelledError   the fan-out was cancelled before the device started
    ├── PartialFailureError         some devices of a fan-out failed (the table says which)
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
    "BusyError",
    "ChangedHostKeyError",
    "ChunkAuthError",
    "ChunkOrderError",
    "ClockSkewError",
    "ConnectError",
    "ConnectionLostError",
    "ConversionError",
    "DeviceError",
    "DeviceOfflineError",
    "DigestMismatchError",
    "DiskFullError",
    "DuplicateError",
    "EnrollTokenError",
    "EnvelopeError",
    "EnvelopeFormatError",
    "EnvelopeMismatchError",
    "ExpiredError",
    "FleetError",
    "FormatError",
    "HealthCheckError",
    "HostKeyError",
    "InvalidModelError",
    "KeyCommitmentError",
    "KeyMaterialError",
    "LabError",
    "MailboxAuthError",
    "MailboxBadSignatureError",
    "MailboxExpiredError",
    "MailboxForbiddenError",
    "MailboxMalformedError",
    "MailboxMisaddressedError",
    "MailboxPendingError",
    "MailboxReplayError",
    "MailboxUnboundAnswerError",
    "MailboxUnsignedError",
    "MalformedUriError",
    "MissingEnvelopeError",
    "ModelError",
    "NoActiveModelError",
    "NoTargetsError",
    "NotFoundError",
    "NotInitializedError",
    "NotRecipientError",
    "OutputLimitError",
    "PackageError",
    "PartialFailureError",
    "PlanError",
    "RateLimitedError",
    "ReferenceMismatchError",
    "RegistryBusyError",
    "RegistryError",
    "RegistryFullError",
    "RegistryIOError",
    "RegistryReadOnlyError",
    "RemoteDiskFullError",
    "RemoteFileError",
    "ReplayError",
    "RequestLimitError",
    "RevokedError",
    "RollbackError",
    "RolloutCancelledError",
    "RolloutError",
    "SchemaTooNewError",
    "ServerAuthError",
    "SizeLimitError",
    "StoreError",
    "TrailingDataError",
    "TransportError",
    "TransportTimeout",
    "TruncatedPayloadError",
    "TrustChainError",
    "UnknownHostKeyError",
    "UnknownSchemeError",
    "UnsafeFileError",
    "UnsafeRootError",
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


class RequestLimitError(UsageError):
    """A serve request past a bound: prompt length, token ids outside the vocabulary,
    connections (``details``: ``limit`` and what was asked)."""

    code = "request_limit"


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


class NoTargetsError(UsageError):
    """Groups, devices and selectors that exist but select no device (a deploy-type
    command refuses to do nothing; a listing prints an empty table)."""

    code = "no_targets"


class ModelError(UsageError):
    code = "model"


class InvalidModelError(ModelError):
    code = "invalid_model"


class UnsafeFileError(InvalidModelError):
    """A file handed to packaging is a symbolic link, not a regular file, resolves outside
    its model folder, or is too large to read (``details``: ``path``, ``reason``)."""

    code = "unsafe_file"


class ConversionError(ModelError):
    code = "conversion_failed"


# -- registry ---------------------------------------------------------------------------
class RegistryError(FleetError):
    code = "registry"


class SchemaTooNewError(RegistryError):
    code = "schema_too_new"


class NotInitializedError(RegistryError):
    code = "not_initialized"


class RegistryReadOnlyError(RegistryError):
    """The registry's storage refuses writes (``details``: ``url``, ``path``). Nothing of
    the operation was written; commands that only read still work where they can."""

    code = "registry_read_only"


class RegistryFullError(RegistryError):
    """No space left where the registry or the package cache lives (``details``: ``url``
    or ``path``). The transaction was rolled back; free space and run the command again."""

    code = "registry_full"


class RegistryBusyError(RegistryError):
    """Another process held the registry's write lock past the wait (``details``:
    ``waited_s``). Nothing was written: retry."""

    code = "registry_busy"
    retryable = True


class RegistryIOError(RegistryError):
    """The registry's storage failed a read or write (SQLite ``disk I/O error``, a lost
    connection to the server). The transaction was rolled back."""

    code = "registry_io"


class KeyMaterialError(FleetError):
    """A signing, device or ssh key is missing, unreadable or has loose permissions."""

    code = "key_material"


# -- transports -------------------------------------------------------------------------
class RevokedError(KeyMaterialError):
    """The device was revoked (``fleet device revoke``): no package is made for it."""

    code = "revoked"


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


class ServerAuthError(AuthError):
    """Pull mode: the fleet server refused this device's token, challenge or signature
    (``details.status`` is the HTTP status)."""

    code = "server_auth"


class EnrollTokenError(ServerAuthError):
    """Pull mode: the enrollment token is unknown, already used or expired."""

    code = "enroll_token"


class RateLimitedError(TransportError):
    """Pull mode: the fleet server answered 429; ``details.retry_after_s`` says when."""

    code = "rate_limited"
    retryable = True


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


class OutputLimitError(TransportError):
    """A device printed more than the controller reads (``details``: ``limit``,
    ``stream``); the rest was discarded, never held in memory."""

    code = "output_limit"


class RemoteDiskFullError(TransportError):
    code = "remote_disk_full"


class AppNotInstalledError(TransportError):
    code = "app_not_installed"


class MailboxAuthError(AuthError):
    """A mailbox request (refused by the app agent) or answer (refused by the controller)
    fails authentication (``docs/agent-protocol.md``, "Mailbox"); ``details`` say which
    request (``request_id``) and why. Never retried: the same bytes fail the same way."""

    code = "mailbox_auth"


class MailboxUnsignedError(MailboxAuthError):
    code = "mailbox_unsigned"


class MailboxBadSignatureError(MailboxAuthError):
    """Signed, but not by the key it must be (``details``: ``signer``, ``expected``), or
    changed after signing."""

    code = "mailbox_bad_signature"


class MailboxReplayError(MailboxAuthError):
    code = "mailbox_replay"


class MailboxExpiredError(MailboxAuthError):
    """Past its expiry, or with an expiry further ahead than a request may live; the
    details carry both clocks (``expires``, ``device_time``, ``tolerance_s``)."""

    code = "mailbox_expired"


class MailboxMisaddressedError(MailboxAuthError):
    code = "mailbox_misaddressed"


class MailboxUnboundAnswerError(MailboxAuthError):
    code = "mailbox_unbound"


class MailboxMalformedError(MailboxAuthError):
    code = "mailbox_malformed"


class MailboxForbiddenError(MailboxAuthError):
    """A verb or an argument the mailbox does not run (``details``: ``verb``, ``reason``)."""

    code = "mailbox_forbidden"


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


class EnvelopeError(PackageError):
    """A per-device key envelope (package format 2, ``docs/package-format.md``) is refused.
    An envelope for another device is :class:`NotRecipientError`; one whose wrap was edited
    fails AES key unwrap: :class:`WrongKeyError`."""

    code = "envelope"


class MissingEnvelopeError(EnvelopeError):
    code = "missing_envelope"


class EnvelopeFormatError(EnvelopeError):
    code = "envelope_format"


class EnvelopeMismatchError(EnvelopeError):
    code = "envelope_mismatch"


class KeyCommitmentError(EnvelopeError):
    code = "key_commitment"


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


class ExpiredError(PackageError):
    """Past its signed ``expires`` by the device clock (``details``: ``expires``,
    ``created``, ``device_time``, ``tolerance_s``): a withheld or frozen package/order."""

    code = "expired"


class ClockSkewError(PackageError):
    """Would be :class:`ExpiredError`, but the controller's clock (sent with the request)
    says it is fresh: the device clock is off (``details``: ``device_time``,
    ``controller_time``, ``skew_s``, ``tolerance_s``). Fix the clock, not the package."""

    code = "clock_skew"


class TrustChainError(PackageError):
    """A root of trust update refused (``details``: ``reason``: ``old_threshold``,
    ``new_threshold``, ``version``, ``no_chain``, ``foreign_root``, ``bad_key``)."""

    code = "trust_chain"


# -- device side ------------------------------------------------------------------------
class DeviceError(FleetError):
    code = "device"


class DiskFullError(DeviceError):
    code = "disk_full"


class BusyError(DeviceError):
    """Another stage/activate/rollback/gc holds the device root's lock and did not let go
    within the wait (``details``: ``lock``, ``waited_s``). Nothing was done: retry."""

    code = "busy"
    retryable = True


class StoreError(DeviceError):
    code = "store"


class UnsafeRootError(StoreError):
    """The device root is not the agent's alone: a folder is a symbolic link, owned by
    another user, or group/other-writable (``details``: ``path``, ``reason``)."""

    code = "unsafe_root"


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


class PlanError(RolloutError):
    """The pure plan refuses this device (``fleet.rollout.plan.decide``). Not the
    package-attack :class:`RollbackError`: nothing was sent, the operator chose a version
    the device must not take this way (``fleet rollback`` with a signed order does it)."""

    code = "plan_refused"


class RolloutCancelledError(RolloutError):
    """The fan-out was cancelled before this device's task started; nothing was done."""

    code = "cancelled"


class PartialFailureError(FleetError):
    """Some devices of a fan-out failed; ``details["failed"]`` maps device -> error code.
    Raised only by ``FleetResult.raise_for_failures`` so one rule picks the exit code;
    ``exit_as`` is the error class whose exit code it takes when every device failed the
    same way (None: the fan-out's own code)."""

    code = "partial_failure"
    exit_as: type[FleetError] | None = None


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
