"""Hypernetwork training: context distillation from alignment prompts, plus task SFT."""
