"""Registering LPI with PEFT's registries."""

from __future__ import annotations

import importlib

import pytest
from helpers import (
    tiny_clip,
    wrap,
)
from peft import mapping

from peft_lpi import register_lpi

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


# ================================================================================================== registration
def test_registration_is_idempotent_and_complete():
    importlib.reload(importlib.import_module("peft_lpi.tuner.registration"))
    import peft_lpi as again  # noqa: F401  (second import is a no-op)

    register_lpi()
    register_lpi()
    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["LPI"].__name__ == "LPIConfig"
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["LPI"].__name__ == "LPIModel"
    assert mapping.PEFT_TYPE_TO_PREFIX_MAPPING["LPI"] == "lpi_"
    assert list(mapping.PEFT_TYPE_TO_PREFIX_MAPPING.values()).count("lpi_") == 1
    model = wrap(tiny_clip())  # still works after re-registration
    assert model.peft_config["default"].peft_type == "LPI"
