"""Registering "LPI" with PEFT 0.21's registries (idempotent), without forking PEFT.

PEFT's `register_peft_method` only accepts members of its `PeftType` enum, so the registries are filled directly,
keyed by `LPIPeftType.LPI`, a str enum member equal to (and hashing like) "LPI" (see `config.LPIPeftType` for why
not a `PeftType` member). PEFT has no plugin discovery: `import peft_lpi` must run before a saved LPI adapter is
loaded.
"""

from __future__ import annotations

from .config import LPI_PEFT_TYPE, LPIConfig
from .model import LPIModel


def register_lpi() -> None:
    """Add LPI to PEFT's config, tuner and prefix registries. Safe to call any number of times."""
    from peft import mapping

    existing_prefix = {v: k for k, v in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items()}.get(LPIModel.prefix)
    if existing_prefix is not None and existing_prefix != LPI_PEFT_TYPE:
        raise RuntimeError(f"The PEFT prefix {LPIModel.prefix!r} is already used by {existing_prefix!r}.")
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[LPI_PEFT_TYPE] = LPIConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[LPI_PEFT_TYPE] = LPIModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[LPI_PEFT_TYPE] = LPIModel.prefix
