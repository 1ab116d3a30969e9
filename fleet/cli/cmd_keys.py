"""``fleet keys init|show``: the controller's Ed25519 signing key."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer
from rich.console import Console
from sqlmodel import select

from fleet.artifacts.keys import SigningKeyInfo, init_signing_key, key_info, load_signing_key
from fleet.cli._ctx import state
from fleet.cli._output import emit
from fleet.cli.app import app
from fleet.core import errors
from fleet.home import FleetHome

keys_app = typer.Typer(help="The controller's signing key (Ed25519, 0600, never in the "
                            "registry).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _record_public(home: FleetHome, info: SigningKeyInfo) -> bool:
    """Keep the public half in the registry for audit, when there is a registry."""
    try:
        from fleet.registry import PublicKey, Registry

        reg = Registry.open(home)
    except errors.RegistryError:
        return False
    try:
        with reg.session() as s:
            if s.exec(select(PublicKey).where(PublicKey.fingerprint == info.fingerprint)
                      ).first() is None:
                s.add(PublicKey(kind="controller_signing", fingerprint=info.fingerprint,
                                public_key=info.public_key))
    finally:
        reg.close()
    return True


def _render(info: dict[str, Any]) -> Any:
    def draw(c: Console) -> None:
        c.print(f"signing key  {info['path']}")
        c.print(f"fingerprint  {info['fingerprint']}")
        c.print(info["public_key"].rstrip(), highlight=False)
    return draw


@keys_app.command("init")
def init(force: Annotated[bool, typer.Option(
             "--force", help="Replace an existing key (every device must be re-enrolled).")
         ] = False,
         as_json: JsonOpt = False) -> None:
    """Make the signing key. Refuses to replace an existing one without --force."""
    home = state().home
    info = init_signing_key(home, force=force)
    data = dataclasses.asdict(info)
    data["registered"] = _record_public(home, info)
    emit(data, as_json=as_json, render=_render(data))


@keys_app.command("show")
def show(as_json: JsonOpt = False) -> None:
    """Print the signing key's public part and fingerprint (what devices pin)."""
    home = state().home
    info = key_info(home.signing_key, load_signing_key(home))
    data = dataclasses.asdict(info)
    emit(data, as_json=as_json, render=_render(data))
