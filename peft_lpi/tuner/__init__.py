"""The LPI tuner: a PEFT method in PEFT's own layout (config, layer, model), importable without Accelerate."""

from .config import LPIConfig
from .model import LPIModel
from .registration import register_lpi

__all__ = ["LPIConfig", "LPIModel", "register_lpi"]
