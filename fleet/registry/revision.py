"""Developer helper: ``python -m fleet.registry.revision MESSAGE`` autogenerates a migration
against a scratch database migrated to head."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from alembic import command

from fleet.registry.db import alembic_config, migrate


def main() -> int:
    message = " ".join(sys.argv[1:]) or "change"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'scratch.db'}"
        migrate(url)
        command.revision(alembic_config(url), message=message, autogenerate=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
