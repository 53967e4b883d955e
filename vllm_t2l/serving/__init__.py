"""The serving layer: the only part of vllm_t2l that imports vLLM."""
