"""Integration: what the plugin's hooks show (and do not show) over HTTP on the real server.

A description is often a private system prompt: no route may show one to a client that did not send it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest

from vllm_t2l.launch import parse_metrics

pytestmark = pytest.mark.server
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ENGINE_NAMES = re.compile(r"(t2l-[0-9a-f]{32}(,t2l-[0-9a-f]{32})*)?")


def chat(client, model: str, max_tokens: int = 4):
    return client.chat.completions.create(model=model, messages=QUESTION, max_tokens=max_tokens, temperature=0)


def secret() -> str:
    return f"Secret system prompt {uuid.uuid4().hex}: never reveal the launch date."


@pytest.fixture(scope="module")
def secrets(client) -> list[str]:
    """Descriptions one client sent (each served), which the checks below read for as another client."""
    sent = [secret() for _ in range(3)]
    for desc in sent:
        assert chat(client, "t2l:" + desc).model.startswith("t2l-")
    chat(client, "t2l:@pirate")
    return sent


def _post(server, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(server.base_url + path, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_models_list_shows_no_generated_adapter(server, secrets, base_model):
    listed = json.loads(server.get("/v1/models"))["data"]
    text = json.dumps(listed)
    assert [card["id"] for card in listed] == [base_model]
    assert not any(s in text for s in secrets) and str(server.cache_dir) not in text


def test_metrics_carry_no_description_and_stay_bounded(server, client, secrets):
    for _ in range(3):  # more adapter combinations: vLLM alone keeps one series per combination ever seen
        chat(client, "t2l:" + secret())
    text = server.get("/metrics")
    assert not any(s[:30] in text for s in secrets)
    info = [labels for name, labels, _ in parse_metrics(text) if name == "vllm:lora_requests_info"]
    assert len(info) <= 1
    for labels in info:
        assert ENGINE_NAMES.fullmatch(labels["running_lora_adapters"])
        assert ENGINE_NAMES.fullmatch(labels["waiting_lora_adapters"])


def test_responses_and_logs_name_adapters_by_content_id(server, client, secrets):
    resp = chat(client, "t2l:" + secrets[0])
    assert re.fullmatch(r"t2l-[0-9a-f]{32}", resp.model)
    log = server.log.read_text()
    assert not any(s in log for s in secrets)
    assert f"serving adapter {resp.model.removeprefix('t2l-')}" in log


def test_errors_quote_at_most_a_truncated_name(client):
    long_name = "t2l:@" + "x" * 500
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, long_name)
    assert "x" * 41 not in str(err.value) and "x" * 20 in str(err.value)


@pytest.mark.parametrize("route, body", [
    ("/v1/load_lora_adapter", {"lora_name": "t2l:Be helpful.", "lora_path": "/tmp"}),
    ("/v1/load_lora_adapter", {"lora_name": "t2l-" + "0" * 32, "lora_path": "/tmp"}),
    ("/v1/unload_lora_adapter", {"lora_name": "t2l:@pirate"}),
])
def test_reserved_names_cannot_be_loaded_or_unloaded_by_clients(server, client, secrets, route, body):
    """Else a client could bind another's description to a folder of its choosing, or probe which are in use."""
    status, text = _post(server, route, body)
    assert status == 400 and ("reserved" in text or "unloaded by the adapter cache" in text)
    assert chat(client, "t2l:@pirate").choices[0].message.content


def _cache_root(server) -> Path:
    return Path(re.findall(r"vllm-t2l: .*checkpoint .* cache (\S+)", server.log.read_text())[-1])


@pytest.mark.parametrize("fault, message", [("full", "adapter cache is full"), ("read-only", "read-only")])
def test_full_or_read_only_cache_gives_400_and_base_keeps_working(server, client, base_model, fault, message):
    root = _cache_root(server)
    if os.geteuid() == 0:  # root writes through file modes: cover the folder with a tiny tmpfs instead
        opts = "ro,size=64k" if fault == "read-only" else "size=4k"
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(root)], capture_output=True).returncode:
            pytest.skip("running as root without permission to mount a tmpfs")
        undo = ["umount", str(root)]
    else:
        if fault == "full":
            pytest.skip("a full disk needs a small tmpfs (root)")
        root.chmod(0o555)
        undo = ["chmod", "755", str(root)]
    try:
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, "t2l:" + secret())
        assert message in str(err.value) and str(root) not in str(err.value)
        assert chat(client, base_model).choices[0].message.content
    finally:
        subprocess.run(undo, check=True)
    assert chat(client, "t2l:" + secret()).choices[0].message.content  # room again: generation works


def test_per_name_bookkeeping_is_bounded(server, client):
    """vLLM alone keeps a lock per name ever asked for and an entry per spelling ever registered."""
    from vllm_t2l.serving.cache import MAX_NAMES

    for i in range(20):
        with pytest.raises(openai.NotFoundError):
            chat(client, f"no-such-adapter-{uuid.uuid4().hex}-{i}")
    assert server.metric("vllm_t2l:resolver_locks") == 0
    desc = secret()
    before = server.metric("vllm_t2l:registered_names")
    spellings = ["t2l:" + desc.replace(" ", " " * (i + 1), 1) for i in range(MAX_NAMES + 4)]
    answers = {chat(client, name).choices[0].message.content for name in spellings}
    assert len(answers) == 1  # one adapter, however it is spelled
    assert server.metric("vllm_t2l:registered_names") == before + MAX_NAMES
    assert server.metric("vllm_t2l:resolver_locks") == 0
