"""PQASGD: periodic quantized averaging (Jiang & Agrawal, NeurIPS 2018), and sparse parameter averaging.

`averager.py` holds the `PQASGD` class (schedule, collectives, checkpoints; its docstring describes
the algorithm); `rules.py` the pure update rules it applies.
"""

from __future__ import annotations

from commcomp.pqasgd.averager import PQASGD, NonFiniteModelError

__all__ = ["PQASGD", "NonFiniteModelError"]
