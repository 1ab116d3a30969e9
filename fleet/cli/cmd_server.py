"""``fleet server [--listen H:P] [--workers N]`` and ``fleet server init-tls``: the device
API that pull-mode devices poll (``docs/device-api.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fleet.cli._ctx import state
from fleet.cli._output import emit, err
from fleet.cli.app import app

server_app = typer.Typer(
    help="The device API for pull-mode devices (HTTPS, uvicorn).\n\n"
         "Examples:\n\n\b\n"
         "  fleet server init-tls --san 10.77.0.1\n"
         "  fleet server --listen 0.0.0.0:8443 --workers 2",
    invoke_without_command=True)
app.add_typer(server_app, name="server")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


@server_app.callback()
def server(
    ctx: typer.Context,
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "0.0.0.0:8443",
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
    tls_cert: Annotated[Path | None, typer.Option(
        help="Server certificate (PEM); default: the one `init-tls` made.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Its private key (PEM).")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Plain HTTP (tests and benchmarks only; devices refuse it "
                           "unless told otherwise).")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "warning",
) -> None:
    """Serve the device API (TLS on by default) on the controller's registry until
    stopped. Devices enroll with the token `fleet device add pull://NAME` printed, check
    in for their signed desired state, download packages (HTTP Range) and upload reports."""
    if ctx.invoked_subcommand is not None:
        return
    from fleet.registry import Registry
    from fleet.server.run import ServeOptions, parse_listen, serve

    host, port = parse_listen(listen)
    home = state().home
    Registry.open(home).close()  # refuse to start on a missing or older registry
    err.print(f"fleet server on {'http' if insecure else 'https'}://{host}:{port} "
              f"({workers} worker(s))", highlight=False)
    serve(home, ServeOptions(host=host, port=port, workers=workers, tls_cert=tls_cert,
                             tls_key=tls_key, insecure=insecure, log_level=log_level))


@server_app.command("init-tls")
def init_tls_cmd(
    san: Annotated[list[str], typer.Option(
        "--san", help="Another IP address or DNS name the certificate names (repeat).")
                   ] = [],  # noqa: B006
    force: Annotated[bool, typer.Option("--force", help="Make a new CA too.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a private CA (kept if it exists) and a server certificate signed by it under
    the controller home; devices pin the CA (`fleet-agent pull --ca`).

    Examples:

    \b
      fleet server init-tls --san 10.77.0.1 --san fleet.lab.example
    """
    from fleet.server.tls import init_tls

    home = state().home
    home.ensure()
    paths = init_tls(home, san=san, force=force)
    emit(paths.to_dict(), as_json=as_json, render=lambda c: c.print(
        f"CA (give it to devices): {paths.ca_cert}\nserver certificate: {paths.cert}\n"
        f"server key: {paths.key}", markup=False, highlight=False))
