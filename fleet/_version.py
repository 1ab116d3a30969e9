"""What the installed ``mnn-fleet`` distribution says about itself.

Looked up lazily (``importlib.metadata`` only when asked), so importing this module costs
nothing at CLI start. Used by ``--version`` on both CLIs, by the registry to find the
migrations of an editable install, and by ``fleet device bootstrap`` to know what to ship.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DIST_NAME", "editable_project", "version", "version_line"]

DIST_NAME = "mnn-fleet"


def version() -> str:
    """The installed distribution's version; ``"unknown"`` when it is not installed (a bare
    checkout on ``PYTHONPATH``), because ``--version`` should answer, not crash."""
    from importlib import metadata

    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


def version_line() -> str:
    """``mnn-fleet <version>``: what ``fleet --version`` and ``fleet-agent --version`` print."""
    return f"{DIST_NAME} {version()}"


def editable_project() -> Path | None:
    """The project directory an editable (development) install points to, else None.

    Read from the install's PEP 610 ``direct_url.json`` (``dir_info.editable``), which pip
    writes for ``pip install -e``. A wheel install, or no install at all, gives None. Never
    raises: a missing or malformed record means "not editable".
    """
    import json
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    try:
        text = metadata.distribution(DIST_NAME).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not (doc.get("dir_info") or {}).get("editable"):
        return None
    url = urlparse(str(doc.get("url", "")))
    if url.scheme != "file" or not url.path:
        return None
    return Path(unquote(url.path))
