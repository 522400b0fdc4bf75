"""safetypatch: train, evaluate, analyse and manage LoRA safety patches for LLMs."""

__version__ = "0.1.0"
