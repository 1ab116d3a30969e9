"""What the controller (``fleet``) and the device agent (``fleet_agent``) share.

Nothing else lives here, and this package imports neither side (checked by the import
contracts in ``pyproject.toml``, run by ``make test``):

- :mod:`.errors`: the error tree, stable codes and exit codes;
- :mod:`.protocol`: the agent protocol envelope (``fleet.agent/1``);
- :mod:`.package`: read, verify and decrypt ``.fpkg`` packages;
- :mod:`.golden` and :mod:`.compare`: the golden-data format and output comparison;
- :mod:`.mnn`: the MNN adapter (load and run a model quietly, fd capture, weight facts);
- :mod:`.filelock` and :mod:`.fsutil`: the file lock, atomic writes, file digests.
"""
