"""peft_lpi: LPI (Low-rank Prompt Interaction) for continual vision-language retrieval, as a PEFT method.

Importing this package registers the "LPI" method with PEFT, so `get_peft_model(model, LPIConfig(...))`,
`PeftModel.from_pretrained` and `AutoPeftModel` work. Import it before loading a saved LPI adapter.
"""

__version__ = "0.1.0"

from .config import LPIConfig  # noqa: E402
from .model import LPIModel  # noqa: E402
from .registration import register_lpi  # noqa: E402

register_lpi()

__all__ = ["LPIConfig", "LPIModel", "register_lpi", "__version__"]
