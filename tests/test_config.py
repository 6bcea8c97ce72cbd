"""LPIConfig validation."""

from __future__ import annotations

import pytest

from peft_lpi import LPIConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread (conftest.py)


# ============================================================================================= config validation
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tasks=0), "num_tasks"),
        (dict(num_tasks=-2), "num_tasks"),
        (dict(num_tasks=True), "num_tasks"),
        (dict(num_tasks=1.5), "num_tasks"),
        (dict(rank=0), "rank"),
        (dict(towers="audio"), "towers"),
        (dict(routing_metric="hamming"), "routing_metric"),
        (dict(format_version=99), "newer"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LPIConfig(**kwargs)
