"""finetune: LoRA/QLoRA fine-tuning for Mixtral-architecture mixture-of-experts models."""

__version__ = "0.1.0"
