"""Prometheus series, exported on vLLM's own /metrics endpoint (the default registry)."""

from prometheus_client import Counter, Gauge, Histogram

GENERATION_SECONDS = Histogram(
    "vllm_t2l:generation_seconds", "Time to embed descriptions, run the hypernetwork and write the adapter.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
STAGE_SECONDS = Histogram(
    "vllm_t2l:stage_seconds", "Time of one generation batch per stage: embed, hypernet, write (the PEFT folder).",
    ["stage"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
CACHE_HITS = Counter("vllm_t2l:cache_hits", "Adapter requests served from the adapter cache.")
CACHE_MISSES = Counter("vllm_t2l:cache_misses", "Adapter requests that generated a new adapter.")
GENERATION_ERRORS = Counter("vllm_t2l:generation_errors", "Adapter generations that failed.")
REJECTED_NAMES = Counter("vllm_t2l:rejected_names", "Adapter names refused as malformed (4xx).")
ADAPTERS_RESIDENT = Gauge("vllm_t2l:adapters_resident", "Adapters held in the adapter cache.")
CACHE_BYTES = Gauge("vllm_t2l:cache_bytes", "Bytes of adapter weights held in the adapter cache.")
REGISTERED_NAMES = Gauge("vllm_t2l:registered_names",
                         "Adapter names registered with vLLM's serving layer (bounded by the cache limits).")
RESOLVER_LOCKS = Gauge("vllm_t2l:resolver_locks", "vLLM's per-name resolution locks currently kept.")
