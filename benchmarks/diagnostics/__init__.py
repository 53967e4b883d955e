"""Diagnostics behind past experiments (docs/experiments.md): they explain a benchmark's figure, they are not one."""
