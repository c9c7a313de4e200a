"""dtrain: distributed LLM supervised fine-tuning on DeepSpeed."""

__version__ = "0.1.0"
