"""peft_lpi: LPI (Low-rank Prompt Interaction) for continual vision-language retrieval, as a PEFT method.

Importing this package registers the "LPI" method with PEFT, so `get_peft_model(model, LPIConfig(...))`,
`PeftModel.from_pretrained` and `AutoPeftModel` work, and makes `PeftModel.push_to_hub` write the LPI model card
for LPI adapters. Import it before loading a saved LPI adapter.

Layers (each importable on its own):
- `peft_lpi.tuner`: the PEFT method (config, prompt factors, prompted layers, routing keys); needs only PEFT.
- `peft_lpi.continual`: methods, losses, objective and the Accelerate continual trainer.
- `peft_lpi.evaluation`: retrieval recall and continual metrics.
- `peft_lpi.data`: datasets builders, preprocessing, the offline world and its backbone.
- `peft_lpi.hub`, `peft_lpi.report`: model cards and run reports.
"""

from ._version import __version__
from .hub import install_push_to_hub
from .tuner import LPIConfig, LPIModel, register_lpi

register_lpi()
install_push_to_hub()

__all__ = ["LPIConfig", "LPIModel", "register_lpi", "__version__"]
