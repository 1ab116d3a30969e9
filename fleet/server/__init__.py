"""``fleet server``: the device API that pull-mode devices poll (``docs/device-api.md``).

Modules: :mod:`.app` (the FastAPI application), :mod:`.auth` (challenge and bearer
tokens, HMAC with a server secret), :mod:`.tokens` (one-time enrollment tokens),
:mod:`.escrow` (the key that lets the server seal a package's key envelope for a device
that enrolls after the package was built), :mod:`.tls` (``fleet server init-tls``),
:mod:`.ratelimit`, :mod:`.settings`, :mod:`.run` (uvicorn). Importing this package
imports none of them (the CLI's ``fleet device add pull://`` needs only
:mod:`.tokens`)."""
