"""The studio's /v1/t2l/ API and /t2l/ page on the real server, over HTTP (httpx and the openai client)."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import re
import tarfile
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest

from vllm_t2l.launch import ServerProcess

pytestmark = pytest.mark.server
QUESTION = [{"role": "user", "content": "Tell me about the sea."}]


def answer(client, model: str) -> str:
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=24, temperature=0)
    return reply.choices[0].message.content


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_routes_come_from_the_endpoint_plugin(server, http):
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/v1/t2l/catalog", "/v1/t2l/catalog/{name}", "/v1/t2l/adapters",
            "/v1/t2l/adapters/{adapter_id}/export", "/v1/t2l/info"} <= set(paths)
    log = server.log.read_text()
    assert "vllm_t2l_studio" in log and "studio at /t2l/" in log


def test_page_is_served_and_fetches_nothing_from_outside(http):
    assert http.get("/t2l", follow_redirects=False).status_code in (307, 308)
    page = http.get("/t2l/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for asset in ["/t2l/studio.js", "/t2l/studio.css"]:
        r = http.get(asset)
        assert r.status_code == 200 and r.text
        assert not re.search(r"https?://", r.text), asset
    assert not re.search(r"(src|href)=\"https?://", page.text)
    assert http.get("/t2l/../../etc/passwd").status_code == 404
    assert http.get("/t2l/index.py").status_code == 404


def test_info(http):
    info = http.get("/v1/t2l/info").json()
    assert info["rank"] > 0 and info["max_strength"] == 4.0 and info["base_model"] and info["checkpoint"]


def test_catalog_crud_persists_and_takes_effect_without_restart(server, http, client):
    name = unique("tone")
    first, second = "Talk like a pirate in every answer.", "WRITE YOUR WHOLE ANSWER IN CAPITAL LETTERS."
    r = http.put(f"/v1/t2l/catalog/{name}", json={"descriptions": [first]})
    assert r.status_code == 201, r.text
    assert r.json() == {"name": name, "model": f"t2l:@{name}", "descriptions": [first], "weights": [1.0],
                        "mode": "weight", "strength": 1.0}
    assert json.loads(server.catalog.read_text())[name] == first  # plain entries stay plain strings
    assert any(item["name"] == name for item in http.get("/v1/t2l/catalog").json()["data"])
    assert answer(client, f"t2l:@{name}") == answer(client, "t2l:" + first)

    r = http.put(f"/v1/t2l/catalog/{name}", json={"descriptions": [second]})
    assert r.status_code == 200
    assert http.get(f"/v1/t2l/catalog/{name}").json()["descriptions"] == [second]
    # the name was served before: the edit must replace the adapter it resolves to
    assert answer(client, f"t2l:@{name}") == answer(client, "t2l:" + second)

    assert http.delete(f"/v1/t2l/catalog/{name}").json() == {"deleted": name}
    assert name not in json.loads(server.catalog.read_text())
    assert http.get(f"/v1/t2l/catalog/{name}").status_code == 404
    assert http.delete(f"/v1/t2l/catalog/{name}").status_code == 404
    with pytest.raises(Exception, match="not in the server's catalog"):
        answer(client, f"t2l:@{name}")


def test_saved_mix_is_the_same_adapter_as_its_name(server, http, client):
    name = unique("mix")
    a, b = "Talk like a pirate in every answer.", "Reply with a numbered list of short points."
    r = http.post("/v1/t2l/catalog", json={"name": name, "descriptions": [a, b], "weights": [0.7, 0.3],
                                            "strength": 1.5})
    assert r.status_code == 201, r.text
    assert json.loads(server.catalog.read_text())[name] == {"descriptions": [a, b], "weights": [0.7, 0.3],
                                                           "mode": "weight", "strength": 1.5}
    by_name = http.post("/v1/t2l/adapters", json={"model": f"t2l:@{name}"}).json()
    inline = f"t2l-mix[strength=1.5]:0.7*{a}||0.3*{b}"
    by_recipe = http.post("/v1/t2l/adapters", json={"descriptions": [a, b], "weights": [0.7, 0.3],
                                                     "strength": 1.5}).json()
    assert by_name["id"] == by_recipe["id"]
    assert by_name["descriptions"] == [a, b] and by_name["strength"] == 1.5
    assert answer(client, f"t2l:@{name}") == answer(client, inline) == answer(client, by_recipe["model"])
    # a saved mix inside a mix expands into its terms, its strength folded into the weights
    nested = http.post("/v1/t2l/adapters", json={"model": f"t2l-mix:2*@{name}"}).json()
    assert nested["weights"] == pytest.approx([0.7 * 1.5 * 2, 0.3 * 1.5 * 2])
    http.delete(f"/v1/t2l/catalog/{name}")


def test_adapters_generate_then_look_up(http):
    desc = f"Answer like a cheerful sailor who loves the sea. ({uuid.uuid4().hex[:8]})"
    assert http.post("/v1/t2l/adapters", json={"descriptions": [desc], "generate": False}).status_code == 404
    made = http.post("/v1/t2l/adapters", json={"descriptions": [desc], "strength": 2}).json()
    assert re.fullmatch(r"[0-9a-f]{32}", made["id"]) and not made["cached"]
    assert made["rank"] >= 1 and made["parameters"] > 0 and made["size_bytes"] > 0
    assert made["model"] == f"t2l[strength=2.0]:{desc}"
    again = http.post("/v1/t2l/adapters", json={"model": made["model"], "generate": False}).json()
    assert again["id"] == made["id"] and again["cached"]


@pytest.mark.parametrize("fmt", ["zip", "tar"])
def test_export_loads_with_peft(http, tmp_path, fmt):
    from peft import PeftConfig
    from safetensors.torch import load_file

    made = http.post("/v1/t2l/adapters", json={"descriptions": ["Talk like a pirate in every answer."],
                                                "strength": 2}).json()
    r = http.get(f"/v1/t2l/adapters/{made['id']}/export", params={"format": fmt})
    assert r.status_code == 200, r.text
    assert f"t2l-{made['id']}." in r.headers["content-disposition"]
    if fmt == "zip":
        zipfile.ZipFile(io.BytesIO(r.content)).extractall(tmp_path)
    else:
        tarfile.open(fileobj=io.BytesIO(r.content)).extractall(tmp_path, filter="data")
    folder = tmp_path / f"t2l-{made['id']}"
    config = PeftConfig.from_pretrained(folder)
    assert config.r == made["rank"]
    tensors = load_file(folder / "adapter_model.safetensors")
    assert sum(t.numel() for t in tensors.values()) == made["parameters"]
    assert json.loads((folder / "vllm_t2l.json").read_text())["strength"] == 2


def test_bad_input_gets_precise_4xx_and_server_stays_up(http):
    cases = [
        (http.put("/v1/t2l/catalog/bad name", json={"descriptions": ["x"]}), 400, "malformed"),
        (http.put("/v1/t2l/catalog/" + "a" * 65, json={"descriptions": ["x"]}), 400, "malformed"),
        (http.put("/v1/t2l/catalog/ok", json={"descriptions": ["   "]}), 400, "empty"),
        (http.put("/v1/t2l/catalog/ok", json={"descriptions": ["x"], "strength": 9}), 400, "outside"),
        (http.put("/v1/t2l/catalog/ok", json={"descriptions": ["x", "y"], "weights": [1]}), 400, "1 weights"),
        (http.put("/v1/t2l/catalog/ok", json={"descriptions": ["@pirate"]}), 400, "other catalog entries"),
        (http.put("/v1/t2l/catalog/ok", json={"descriptions": []}), 400, "body.descriptions"),
        (http.put("/v1/t2l/catalog/ok", json={"descriptions": ["x"], "colour": 1}), 400, "colour"),
        (http.put("/v1/t2l/catalog/ok", content=b"{not json", headers={"content-type": "application/json"}),
         400, "JSON"),
        (http.put("/v1/t2l/catalog/ok", content=b"x" * (300 * 1024), headers={"content-type": "application/json"}),
         413, "KiB"),
        (http.get("/v1/t2l/catalog/nobody"), 404, "not in the server's catalog"),
        (http.post("/v1/t2l/adapters", json={"model": "t2l:@nobody"}), 400, "not in the server's catalog"),
        (http.post("/v1/t2l/adapters", json={"model": "gpt-4"}), 400, "start with"),
        (http.post("/v1/t2l/adapters", json={"model": "t2l-mix:0.5*a||nan*b"}), 400, "finite"),
        (http.post("/v1/t2l/adapters", json={}), 400, "either"),
        (http.post("/v1/t2l/adapters", json={"descriptions": ["a||b", "c"]}), 400, "'||'"),
        (http.get("/v1/t2l/adapters/../../etc/export"), 404, ""),
        (http.get("/v1/t2l/adapters/NOTHEX/export"), 400, "hex"),
        (http.get(f"/v1/t2l/adapters/{'0' * 32}/export"), 404, "not in the cache"),
        (http.get(f"/v1/t2l/adapters/{'0' * 32}/export", params={"format": "rar"}), 400, "format"),
    ]
    for r, status, text in cases:
        assert r.status_code == status, (r.request.url, r.text)
        assert text in r.text, (r.request.url, r.text)
    assert http.get("/health").status_code == 200


def test_concurrent_edits_last_writer_wins_nothing_lost(server, http):
    name = unique("race")
    others = [unique("other") for _ in range(8)]
    bodies = [(name, f"Variant {i}: talk like a pirate.") for i in range(16)] + [(o, f"about {o}") for o in others]
    with cf.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda nd: http.put(f"/v1/t2l/catalog/{nd[0]}",
                                                  json={"descriptions": [nd[1]]}).status_code, bodies))
    assert set(codes) <= {200, 201}
    on_disk = json.loads(server.catalog.read_text())  # one whole, valid file
    served = http.get(f"/v1/t2l/catalog/{name}").json()["descriptions"][0]
    assert on_disk[name] == served and served.startswith("Variant ")
    assert all(on_disk[o] == f"about {o}" for o in others)
    assert not list(Path(server.catalog).parent.glob(".catalog.json.*.tmp"))
    for n in [name, *others]:
        http.delete(f"/v1/t2l/catalog/{n}")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server started with --api-key, and no --catalog: the catalog lives under VLLM_T2L_HOME."""
    root = tmp_path_factory.mktemp("keyed")
    home = root / "home"
    home.mkdir()
    import os

    from vllm_t2l.models import home as default_home

    for entry in ["models"]:  # share the prepared models; keep the catalog and adapters apart
        (home / entry).symlink_to(default_home() / entry)
    env = {"VLLM_T2L_HOME": str(home), "VLLM_T2L_CACHE_DIR": str(root / "adapters")}
    assert "VLLM_PLUGINS" not in os.environ or "vllm_t2l_studio" in os.environ["VLLM_PLUGINS"]
    with ServerProcess(["--api-key", "sesame", "--max-num-seqs", "8"], root / "server.log", env=env) as srv:
        srv.home = home
        yield srv


def test_api_key_guards_the_api_not_the_page(keyed):
    with httpx.Client(base_url=keyed.base_url, timeout=120) as c:
        assert c.get("/v1/t2l/catalog").status_code == 401
        assert c.get("/v1/t2l/catalog", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/t2l/").status_code == 200
        auth = {"Authorization": "Bearer sesame"}
        assert c.get("/v1/t2l/catalog", headers=auth).json() == {"data": []}
        assert c.put("/v1/t2l/catalog/kept", json={"descriptions": ["Be brief."]}, headers=auth).status_code == 201
        assert json.loads((keyed.home / "catalog.json").read_text()) == {"kept": "Be brief."}
        assert c.post("/v1/t2l/adapters", json={"model": "t2l:@kept"}, headers=auth).status_code == 200
