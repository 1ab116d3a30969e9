"""Rollouts: planning is pure (:mod:`plan`), doing is I/O (:mod:`execute`, :mod:`deploy`)."""
