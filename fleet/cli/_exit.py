"""One table maps error classes to exit codes; the most specific class in the MRO wins."""

from __future__ import annotations

from fleet.core import errors

__all__ = ["EXIT_CODES", "exit_code_for"]

EXIT_CODES: dict[type[BaseException], int] = {
    errors.FleetError: 1,
    errors.UsageError: 2,
    errors.MalformedUriError: 3,
    errors.UnknownSchemeError: 4,
    errors.NotFoundError: 5,
    errors.DuplicateError: 6,
    errors.SchemaTooNewError: 7,
    errors.NotInitializedError: 8,
    errors.ModelError: 9,
    errors.InvalidModelError: 9,
    errors.ConversionError: 10,
    errors.KeyMaterialError: 11,
    errors.TransportError: 12,
    errors.HostKeyError: 13,
    errors.AuthError: 14,
    errors.PackageError: 15,
    errors.DeviceError: 16,
    errors.RolloutError: 17,
    errors.AgentError: 18,
    errors.MailboxPendingError: 19,
    errors.PartialFailureError: 20,
    errors.RegistryError: 21,
    errors.RegistryReadOnlyError: 22,
    errors.RegistryFullError: 23,
    errors.RegistryBusyError: 24,
    errors.RegistryIOError: 25,
    errors.NoTargetsError: 26,
}
#: a fan-out where some devices failed (the table says which)
PARTIAL_FAILURE = EXIT_CODES[errors.PartialFailureError]


def exit_code_for(exc: BaseException) -> int:
    """The code of the most specific class in ``exc``'s MRO (a fan-out's
    ``PartialFailureError.exit_as`` stands in for its own class when set)."""
    as_cls = getattr(exc, "exit_as", None) if isinstance(exc, errors.PartialFailureError) \
        else None
    for cls in (as_cls or type(exc)).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1
