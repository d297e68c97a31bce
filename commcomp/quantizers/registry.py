"""The quantizer registry (kept apart so quantizer modules can register without import cycles)."""

from commcomp.quantizers.base import Quantizer
from commcomp.registry import Registry

QUANTIZERS: Registry[Quantizer] = Registry("quantizer")
