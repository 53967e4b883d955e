"""Integration: two real servers (replicas) sharing one adapter cache folder, one of them with --api-key.

Content ids are deterministic, so replicas agree on adapters without talking: the same new descriptions
sent to both at once must all succeed, with the same answers, whichever replica writes a folder first.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.error
import urllib.request
import uuid

import pytest

from vllm_t2l.launch import ServerProcess
from vllm_t2l.serving.cache import MANIFEST, verify

pytestmark = pytest.mark.server
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]
API_KEY = "replica-key-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    shared = root / "adapters"
    common = ["--cache-dir", str(shared), "--max-loras", "2", "--max-num-seqs", "32"]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB per server on CPU: two servers share the test machine
    a = ServerProcess(common, root / "a.log", env)
    b = ServerProcess([*common, "--api-key", API_KEY], root / "b.log", env)
    try:
        with cf.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda s: s.start(), (a, b)))
        yield a, b, shared
    finally:
        a.stop()
        b.stop()


def client(server, key: str = "none"):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def test_same_new_descriptions_on_both_replicas_at_once(replicas):
    a, b, shared = replicas
    descs = [f"Answer like a sailor who loves knot number {i}. (replica test {uuid.uuid4().hex[:8]})"
             for i in range(12)]
    jobs = [(srv, key, d) for d in descs for srv, key in ((a, "none"), (b, API_KEY))]

    def ask(job):
        srv, key, desc = job
        resp = client(srv, key).chat.completions.create(model="t2l:" + desc, messages=QUESTION, max_tokens=12,
                                                       temperature=0)
        return resp.choices[0].message.content

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))  # raises on any error
    for i in range(len(descs)):
        assert answers[2 * i] == answers[2 * i + 1], descs[i]
    folders = [p for p in shared.rglob(MANIFEST)]
    assert len(folders) == len(descs) and all(verify(p.parent) for p in folders)
    assert not [p for p in shared.rglob(".tmp-*")]
    for srv in (a, b):
        log = srv.log.read_text()
        assert "generation of adapter" not in log and "Directory not empty" not in log


def _status(server, path: str, body: dict | None = None, key: str | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(server.base_url + path, json.dumps(body).encode() if body else None, headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("path, body", [
    ("/v1/models", None),
    ("/v1/chat/completions", {"model": "t2l:@pirate", "messages": QUESTION, "max_tokens": 2}),
    ("/v1/chat/completions", {"model": "t2l:Talk like a pirate.", "messages": QUESTION, "max_tokens": 2}),
    ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
    ("/v1/unload_lora_adapter", {"lora_name": "x"}),
])
def test_api_key_guards_every_route_adapters_go_through(replicas, path, body):
    _, b, _ = replicas
    assert _status(b, path, body) == 401
    assert _status(b, path, body, key="wrong") == 401


def test_another_client_reads_no_description_from_either_replica(replicas):
    a, b, _ = replicas
    desc = f"My private system prompt {uuid.uuid4().hex}: the merger closes on Friday."
    client(b, API_KEY).chat.completions.create(model="t2l:" + desc, messages=QUESTION, max_tokens=2)
    client(a).chat.completions.create(model="t2l:" + desc, messages=QUESTION, max_tokens=2)
    for srv, key in ((a, None), (b, API_KEY)):
        req = urllib.request.Request(srv.base_url + "/v1/models",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
        listed = urllib.request.urlopen(req, timeout=10).read().decode()
        assert "private" not in listed and str(replicas[2]) not in listed
        assert "merger" not in srv.get("/metrics")
