"""peft_lpi: LPI (Low-rank Prompt Interaction) for continual vision-language retrieval, as a PEFT method."""

__version__ = "0.1.0"
