"""Rollouts: planning is pure (:mod:`plan`); doing is I/O (:mod:`fanout`, the one
fan-out; :mod:`deploy`, :mod:`waves`, :mod:`lora_push`)."""
