"""vllm-t2l: serve LoRA adapters generated from text descriptions, inside vLLM."""

__version__ = "0.1.0"
