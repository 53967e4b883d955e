"""The control benchmark's adapter names (the served run: `python -m benchmarks.control`)."""

from __future__ import annotations

import pytest

from benchmarks.control import PAIRS, mix_name
from vllm_t2l.names import parse


@pytest.mark.parametrize("mode", ["weight", "emb"])
@pytest.mark.parametrize("strength", [1.0, 2.0])
def test_mix_names_parse_to_the_mix_at_its_strength(mode, strength):
    pair = PAIRS[0]
    spec = parse(mix_name(pair, mode, 0.25, strength))
    assert (spec.mode, spec.strength, list(spec.descriptions), list(spec.weights)) == (mode, strength, [pair.a, pair.b],
                                                                                      [0.75, 0.25])
