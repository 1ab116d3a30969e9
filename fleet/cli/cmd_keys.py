"""``fleet keys init|show|rotate|revoke|status``: the root of trust and the signing key.

Files (``fleet.artifacts.trust``): ``keys/root_key.pem`` (offline root key, 0600),
``keys/signing_key.pem`` (online key, 0600), ``keys/roots/root.<N>.json`` (root documents).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from sqlmodel import select

from fleet.artifacts.keys import SigningKeyInfo, key_info, load_signing_key
from fleet.artifacts.trust import init_trust, revoke_key, rotate_key, trust_status
from fleet.cli._ctx import state
from fleet.cli._output import confirm, emit, table
from fleet.cli.app import app
from fleet.core import errors
from fleet.home import FleetHome

keys_app = typer.Typer(help="The root of trust (offline root key, root documents) and the "
                            "online signing key (Ed25519, 0600, never in the registry).\n\n"
                            "Examples:\n\n\b\n"
                            "  fleet keys init\n"
                            "  fleet keys status",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def _registry(home: FleetHome) -> Any:
    try:
        from fleet.registry import Registry

        return Registry.open(home)
    except errors.RegistryError:
        return None


def _record_public(home: FleetHome, info: SigningKeyInfo) -> bool:
    """Keep the public half in the registry for audit, when there is a registry."""
    from fleet.registry import PublicKey

    reg = _registry(home)
    if reg is None:
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


def _key_data(home: FleetHome) -> dict[str, Any]:
    data = dataclasses.asdict(key_info(home.signing_key, load_signing_key(home)))
    st = trust_status(home, None)
    data["root"] = {"version": st["root_version"], "expires": st["root_expires"],
                    "root_key": st["root_key"], "root_keys": st["root_keys"],
                    "online_keys": st["online_keys"]}
    return data


def _render(info: dict[str, Any]) -> Any:
    def draw(c: Console) -> None:
        root = info.get("root") or {}
        c.print(f"signing key  {escape(info['path'])}", highlight=False)
        c.print(f"fingerprint  {info['fingerprint']}", highlight=False)
        c.print(f"root         v{root.get('version')} (expires {root.get('expires')}), "
                f"root key {escape(str(root.get('root_key')))}", highlight=False)
        c.print(info["public_key"].rstrip(), highlight=False)
    return draw


@keys_app.command("init")
def init(force: Annotated[bool, typer.Option(
             "--force", help="Start over: new root and signing keys (every device must be "
                             "wiped and enrolled again).")] = False,
         yes: YesOpt = False, as_json: JsonOpt = False) -> None:
    """Make the offline root key, the online signing key and root v1 (what devices pin).
    A home with a signing key but no root keeps the key (root v1 lists it).

    Examples:

    \b
      fleet keys init
      fleet keys init --force --yes
    """
    home = state().home
    if force:
        confirm("replace the root of trust (every enrolled device will refuse this "
                 "controller)", yes)
    init_trust(home, force=force)
    data = _key_data(home)
    data["registered"] = _record_public(home, key_info(home.signing_key,
                                                       load_signing_key(home)))
    emit(data, as_json=as_json, render=_render(data))


@keys_app.command("show")
def show(as_json: JsonOpt = False) -> None:
    """Print the signing key's public part and fingerprint, and the root of trust.

    Examples:

    \b
      fleet keys show --json
    """
    data = _key_data(state().home)
    emit(data, as_json=as_json, render=_render(data))


@keys_app.command("rotate")
def rotate(yes: YesOpt = False, as_json: JsonOpt = False) -> None:
    """New online signing key; root vN+1 (signed by the root key) lists it and keeps the
    old key as retiring. Devices get the new root with the next deploy or enroll.

    Examples:

    \b
      fleet keys rotate --yes
    """
    home = state().home
    confirm("rotate the online signing key", yes)
    reg = _registry(home)
    data = rotate_key(home, reg)
    _record_public(home, key_info(home.signing_key, load_signing_key(home)))
    emit(data, as_json=as_json, render=lambda c: c.print(
        f"signing key now {data['fingerprint']} (root v{data['root_version']}; retiring: "
        f"{', '.join(data['retiring']) or '-'})", highlight=False))


@keys_app.command("revoke")
def revoke(fingerprint: str, yes: YesOpt = False, as_json: JsonOpt = False) -> None:
    """Root vN+1 without FINGERPRINT (as `fleet keys show` prints it): devices refuse what
    it signs once they have that root (next deploy or enroll).

    Examples:

    \b
      fleet keys revoke SHA256:... --yes
    """
    home = state().home
    confirm(f"revoke {fingerprint}", yes)
    data = revoke_key(home, fingerprint)
    emit(data, as_json=as_json, render=lambda c: c.print(
        f"{fingerprint} revoked from root v{data['root_version']}"
        + (" (already)" if data["already"] else ""), highlight=False))


@keys_app.command("status")
def status(as_json: JsonOpt = False) -> None:
    """Root version, online keys, and the root version each device holds (registry).

    Examples:

    \b
      fleet keys status
      fleet keys status -o wide
    """
    home = state().home
    data = trust_status(home, _registry(home))

    def render(c: Console) -> None:
        c.print(f"root v{data['root_version']} (expires {data['root_expires']})",
                highlight=False)
        for k in data["online_keys"]:
            c.print(f"  {k['fingerprint']}  {k['state']}", highlight=False)
        for fp, when in data["revoked"].items():
            c.print(f"  {fp}  revoked {when}", highlight=False)
        c.print(table(None, ["device", "root", "up to date", "revoked"],
                      [(d["name"], d["root_version"] or "-", d["up_to_date"],
                        d["revoked"]) for d in data.get("devices", [])]))

    emit(data, as_json=as_json, render=render)
