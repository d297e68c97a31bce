"""The quantizer registry (kept apart so quantizer modules can register without import cycles)."""

from commcomp.registry import Registry
from commcomp.quantizers.base import Quantizer

QUANTIZERS: Registry[Quantizer] = Registry("quantizer")
