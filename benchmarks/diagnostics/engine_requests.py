"""Is vLLM's engine core leaking a block per request? Builds requests the way its input thread does and counts
what Python's tracemalloc still holds from them.

    .venv/bin/python -m benchmarks.diagnostics.engine_requests [--calls 1000,3000,6000,12000]

In a served engine core, tracemalloc shows one site growing by one ~200-byte block per request:
``Request.from_engine_core_request`` in vllm/v1/request.py, with or without this plugin and with or without
adapters. Here each count runs in a fresh process: an ``EngineCoreRequest`` encoded and decoded with vLLM's
msgpack, then turned into a ``Request`` and dropped, as the engine does. If the blocks left stop growing
near 2,000, they are CPython's free list of tuples (the call's keyword names; 2,000 kept per size), bounded,
not a leak. A diagnostic, not a benchmark.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import tracemalloc


def held_after(calls: int) -> tuple[int, int]:
    """Blocks and bytes still traced at vLLM's request module after ``calls`` requests came and went."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1 import request as request_module
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    encoder, decoder = MsgpackEncoder(), MsgpackDecoder(EngineCoreRequest)

    def one(i: int) -> None:
        sent = EngineCoreRequest(request_id=f"r{i}", prompt_token_ids=list(range(20)), mm_features=None,
                                 sampling_params=SamplingParams(max_tokens=4), pooling_params=None,
                                 arrival_time=time.time(), lora_request=None, cache_salt=None,
                                 data_parallel_rank=None)
        request_module.Request.from_engine_core_request(decoder.decode(encoder.encode(sent)), None)

    for i in range(50):  # warm up before tracing
        one(i)
    tracemalloc.start()
    for i in range(calls):
        one(i)
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, request_module.__file__)])
    stats = snapshot.statistics("filename")
    return sum(s.count for s in stats), sum(s.size for s in stats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", default="1000,3000,6000,12000", help="comma-separated request counts")
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    print("| requests | blocks still traced in vllm/v1/request.py | KiB |\n|---|---|---|")
    for calls in (int(c) for c in args.calls.split(",")):
        with spawn.Pool(1) as pool:
            blocks, size = pool.apply(held_after, (calls,))
        print(f"| {calls} | {blocks} | {size / 1024:.0f} |", flush=True)


if __name__ == "__main__":
    main()
