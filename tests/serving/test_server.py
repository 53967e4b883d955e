"""Integration: the real vLLM OpenAI server with the plugin and the embedded default, over HTTP."""

from __future__ import annotations

import concurrent.futures as cf
import json
import subprocess
import sys
import uuid
from pathlib import Path

import openai
import pytest
from conftest import peft_logprobs

pytestmark = pytest.mark.server
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat(client, model: str, max_tokens: int = 24, messages=QUESTION, logprobs: bool = False):
    extra = {"logprobs": True, "top_logprobs": 0,
             "extra_body": {"return_tokens_as_token_ids": True}} if logprobs else {}
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                          temperature=0, **extra)


def text(resp) -> str:
    return resp.choices[0].message.content


def token_logprobs(resp) -> list[float]:
    return [t.logprob for t in resp.choices[0].logprobs.content]


def new_description() -> str:
    return f"Answer like a cheerful sailor who loves the sea. (test {uuid.uuid4().hex[:8]})"


def test_startup_log_states_checkpoint(server, client):
    log = server.log.read_text()
    assert "vllm-t2l:" in log and "checkpoint" in log
    assert ("TRAINED checkpoint" in log) or ("UNTRAINED" in log)


def test_lora_engine_is_compiled(server):
    """vLLM's CPU platform alone runs a LoRA engine eagerly; with the plugin's LoRA op, the engine (whose
    mixed-batch and peft tests below then run compiled) keeps the compilation mode of a plain engine."""
    log = server.log.read_text()
    assert "torch.compile stays on with LoRA" in log
    engine = next(line for line in log.splitlines() if "Initializing a V1 LLM engine" in line)
    assert "enforce_eager=False" in engine and "'mode': <CompilationMode.NONE" not in engine


def test_description_adapter_is_deterministic(client):
    name = "t2l:Answer like a patient math tutor who explains every step."
    outs = {text(chat(client, name)) for _ in range(3)}
    assert len(outs) == 1


def test_different_descriptions_change_outputs(client, base_model):
    # Descriptions from different families: within a family (a pirate, a grumpy sailor) the shipped
    # checkpoint's adapters differ by only ~7%, and greedy answers can coincide.
    names = ["t2l:Talk like a pirate in every answer.",
             "t2l:Reply with a numbered list of short points.",
             "t2l:WRITE YOUR WHOLE ANSWER IN CAPITAL LETTERS."]
    open_ended = [{"role": "user", "content": "Tell me about the sea."}]  # room for answers to differ
    outs = [text(chat(client, n, max_tokens=32, messages=open_ended)) for n in names]
    base = text(chat(client, base_model, max_tokens=32, messages=open_ended))
    assert len(set(outs)) == len(outs), outs
    assert any(o != base for o in outs)


@pytest.mark.parametrize("name, problem", [
    ("t2l:", "empty"),
    ("t2l:    ", "empty"),
    ("t2l:" + "x" * 5000, "limit"),
    ("t2l:bad\x01char", "control"),
    ("t2l:@not-in-catalog", "catalog"),
    ("t2l:@../../etc/passwd", "malformed"),
    ("t2l-mix:0.5*a||nan*b", "finite"),
    ("t2l-mix:0.5*a||9*b", "outside"),
    ("t2l-mix:abc*a", "not a number"),
    ("t2l-mix:a", "weight"),
])
def test_malformed_names_get_400_and_server_keeps_serving(client, base_model, name, problem):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, name)
    assert problem in str(err.value)
    assert text(chat(client, base_model, max_tokens=4))


def test_unknown_plain_name_is_404(client):
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-adapter")


def test_catalog_name_equals_inline_description(server, client):
    by_name = text(chat(client, "t2l:@pirate"))
    inline = text(chat(client, "t2l:" + server.catalog_entries["pirate"]))
    assert by_name == inline


def test_normalised_descriptions_share_one_adapter(client, server):
    desc = new_description()
    first = text(chat(client, "t2l:" + desc))
    misses = server.metric("vllm_t2l:cache_misses_total")
    spaced = text(chat(client, "t2l:  " + desc.replace(" ", "   \t")))
    assert spaced == first
    assert server.metric("vllm_t2l:cache_misses_total") == misses


def test_concurrent_misses_generate_once(client, server):
    name = "t2l:" + new_description()
    misses = server.metric("vllm_t2l:cache_misses_total")
    with cf.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda _: text(chat(client, name, max_tokens=8)), range(16)))
    assert len(set(outs)) == 1
    assert server.metric("vllm_t2l:cache_misses_total") == misses + 1


def test_base_rows_in_mixed_batch_equal_base_alone(client, base_model):
    """--max-loras 2: both slots hold adapters while base rows run in the same batch."""
    alone = token_logprobs(chat(client, base_model, max_tokens=12, logprobs=True))
    adapters = ["t2l:Answer only in capital letters.", "t2l:Talk like a pirate in every answer."]
    for name in adapters:
        chat(client, name, max_tokens=2)
    jobs = [base_model, *adapters, base_model, *adapters, base_model]
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda m: chat(client, m, max_tokens=12, logprobs=True), jobs))
    for model, resp in zip(jobs, results):
        if model == base_model:
            assert token_logprobs(resp) == pytest.approx(alone, abs=2e-3)


def test_generation_does_not_block_other_requests(client, base_model):
    with cf.ThreadPoolExecutor(4) as pool:
        adapter = pool.submit(chat, client, "t2l:" + new_description(), 8)
        stream = pool.submit(lambda: "".join(
            (c.choices[0].delta.content or "") for c in client.chat.completions.create(
                model=base_model, messages=QUESTION, max_tokens=16, temperature=0, stream=True)))
        assert stream.result() and text(adapter.result())


def test_metrics_exported(server, client):
    chat(client, "t2l:@terse", max_tokens=2)
    for name in ("vllm_t2l:cache_hits_total", "vllm_t2l:cache_misses_total",
                 "vllm_t2l:adapters_resident", "vllm_t2l:generation_errors_total",
                 "vllm_t2l:generation_seconds_count"):
        assert server.metric(name) >= 0
    assert server.metric("vllm_t2l:generation_seconds_count") >= 1
    assert server.metric("vllm_t2l:adapters_resident") >= 1


@pytest.mark.parametrize("strength", [1.0, 2.5])
def test_exported_adapter_matches_peft(server, client, tmp_path, strength):
    """`vllm-t2l generate` writes the same adapter the server serves, at any strength; peft reproduces its logprobs."""
    desc = "Answer like a patient math tutor who explains every step."
    out = tmp_path / "adapter"
    subprocess.run([sys.executable, "-m", "vllm_t2l.cli", "generate", "--description", desc,
                    "--strength", str(strength), "--out", str(out)], check=True, capture_output=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == (8 if strength == 1 else 16) and config["peft_type"] == "LORA"  # the follow network's 8

    resp = chat(client, f"t2l[strength={strength}]:" + desc if strength != 1 else "t2l:" + desc, max_tokens=10,
                logprobs=True)
    served = resp.choices[0].logprobs.content
    ours, _ = peft_logprobs(out, QUESTION, [int(t.token.removeprefix("token_id:")) for t in served])
    assert ours == pytest.approx([t.logprob for t in served], abs=5e-3)


def test_mix_with_weights_one_zero_equals_first_description(client):
    first, second = "Talk like a pirate in every answer.", "Answer in one very short sentence."
    alone = token_logprobs(chat(client, "t2l:" + first, max_tokens=12, logprobs=True))
    mixed = token_logprobs(chat(client, f"t2l-mix:1*{first}||0*{second}", max_tokens=12, logprobs=True))
    assert mixed == pytest.approx(alone, abs=1e-4)



def test_example_client_shows_each_description_four_ways(server):
    script = Path(__file__).parents[2] / "examples" / "client.py"
    out = subprocess.run([sys.executable, str(script), "--base-url", server.base_url + "/v1"], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    assert out.count("system prompt:") == out.count("t2l:  (strength 1)") == out.count("=== ") == 4
    assert "base model:" in out and "t2l[strength=2]:" in out  # the default recommends 2 (or 1: then 2 is shown)


def test_example_client_without_a_server_says_so_in_one_line():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).parents[2] / "examples" / "client.py"
    done = subprocess.run([sys.executable, str(script), "--base-url", f"http://127.0.0.1:{port}/v1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"no server answers at http://127.0.0.1:{port}/v1: start one with "
                                                "`vllm-t2l serve` and wait for 'Application startup complete'"]
