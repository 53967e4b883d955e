"""The adapter studio: the ``/v1/t2l/`` API and the ``/t2l/`` page, added through ``vllm.endpoint_plugins``.

Why here: the loop the project is for (write a description, compare the adapter with the system prompt,
dial it, keep it) needs a catalog that changes while the server runs and a way to take an adapter away.
The routes sit under ``/v1`` so vLLM's ``--api-key`` middleware guards them as it guards its own; the page
is static and holds no data, and sends the key the user types with each call.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import tarfile
import tempfile
import zipfile
from argparse import Namespace
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field

from vllm_t2l import codes, names
from vllm_t2l.lora import METADATA_FILE, LoRAWeights
from vllm_t2l.names import AdapterNameError, CatalogEntry
from vllm_t2l.serving.cache import KEY
from vllm_t2l.serving.catalog import CatalogStore, CatalogWriteError
from vllm_t2l.serving.resolver import AdapterRequestError, T2LResolver

log = logging.getLogger("vllm.t2l")
STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"studio.js": "text/javascript", "studio.css": "text/css"}
MAX_BODY = 256 * 1024
CATALOG_FILE = "catalog.json"  # under VLLM_T2L_HOME when the server has no --catalog


# ---- request and response bodies -------------------------------------------------------------

class Recipe(BaseModel):
    """What an adapter is made of: descriptions with weights, mixed in weight or description space."""

    model_config = ConfigDict(extra="forbid")
    descriptions: list[str] = Field(min_length=1, max_length=64)
    weights: list[float] | None = Field(None, description="one per description; default 1 each")
    mode: Literal["weight", "emb"] = "weight"
    strength: float = Field(1.0, description="the update scaled by this; 1 mirrors the system prompt")


class CatalogItem(Recipe):
    name: str = Field(description="used as `t2l:@name`")
    model: str = Field("", description="the `model` name that serves it (t2l:@name)")


class AdapterRequest(BaseModel):
    """Either ``model`` (any t2l name) or a recipe."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=40000, description="a t2l name, e.g. t2l:@pirate")
    descriptions: list[str] | None = Field(None, min_length=1, max_length=64)
    weights: list[float] | None = None
    mode: Literal["weight", "emb"] = "weight"
    strength: float = 1.0
    generate: bool = Field(True, description="false: only look up, 404 when not generated yet")


class AdapterInfo(BaseModel):
    id: str = Field(description="content id: the same recipe gives the same id on every replica")
    model: str = Field(description="the `model` name to send to /v1/chat/completions")
    rank: int
    parameters: int = Field(description="LoRA parameters of the exported PEFT folder")
    size_bytes: int = Field(description="bytes the adapter takes in the server's cache")
    cached: bool = Field(description="whether it was already generated before this call")
    descriptions: list[str]
    weights: list[float]
    mode: str
    strength: float
    checkpoint: str


class Info(BaseModel):
    base_model: str
    checkpoint: str
    trained: bool
    rank: int
    max_chars: int
    max_terms: int
    max_abs_weight: float
    max_strength: float
    recommended_strength: float
    catalog_names: int


# ---- the studio's state ----------------------------------------------------------------------

class Studio:
    """Binds the resolver (made by the general plugin in this process) to vLLM's model registry."""

    def __init__(self, resolver: T2LResolver, models):
        self.resolver = resolver
        self.models = models
        self.store: CatalogStore | None = None

    def start(self) -> None:
        from vllm_t2l.models import home

        r = self.resolver
        path = Path(r.settings.catalog) if r.settings.catalog else home() / CATALOG_FILE
        self.store = CatalogStore.open(path, self._publish, r.settings.limits)
        r.catalog = dict(self.store.entries)
        log.info("vllm-t2l: studio at /t2l/, API at /v1/t2l/, catalog %s (%d names)", path, len(r.catalog))

    def _publish(self, entries: dict) -> None:
        self.resolver.catalog = entries  # one assignment: a request sees the old catalog or the new one

    def forget(self, catalog_name: str) -> None:
        """Unregister every name that refers to ``@catalog_name``, so its next request resolves the new entry;
        requests already running keep the adapter they were given."""
        ref = re.compile(r"@\s*" + re.escape(catalog_name) + r"(?![A-Za-z0-9_.\-])")
        for lora_name in [n for n in self.models.lora_requests if ref.search(n)]:
            self.models.lora_requests.pop(lora_name, None)

    @property
    def base_model(self) -> str:
        return self.models.base_model_paths[0].name


def _studio(request: Request) -> Studio:
    studio = getattr(request.app.state, "t2l_studio", None)
    if studio is None or studio.resolver.generator is None or studio.store is None:
        raise HTTPException(503, "vllm-t2l is not started: LoRA is off (--enable-lora) or the plugin failed "
                                 "to load; see the server log")
    return studio


class LimitedRoute(APIRoute):
    """Refuses an oversized body before FastAPI reads it (and so before it is parsed)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def limited(request: Request) -> Response:
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
                raise HTTPException(413, f"request body is over the {MAX_BODY // 1024} KiB limit")
            return await handler(request)

        return limited


# ---- names -----------------------------------------------------------------------------------

def model_name(entry: CatalogEntry) -> str:
    """The ``model`` name that stands for a recipe (the inverse of ``names.parse``)."""
    options = [] if entry.mode == "weight" else [entry.mode]
    if entry.strength != 1.0:
        options.append(f"strength={entry.strength!r}")
    if len(entry.terms) == 1 and entry.terms[0][1] == 1.0 and entry.mode == "weight":
        head = "t2l"
        body = entry.terms[0][0]
    else:
        head = "t2l-mix"
        body = "||".join(f"{w!r}*{d}" for d, w in entry.terms)
    return f"{head}[{','.join(options)}]:{body}" if options else f"{head}:{body}"


def _recipe_name(recipe: Recipe | AdapterRequest, studio: Studio) -> str:
    limits = studio.resolver.settings.limits
    spec = names.spec_from_parts(recipe.descriptions, recipe.weights, recipe.mode, studio.resolver.catalog,
                                 limits, recipe.strength)
    name = model_name(CatalogEntry(spec.terms, spec.mode, spec.strength))
    try:
        same = names.parse(name, studio.resolver.catalog, limits) == spec
    except AdapterNameError:
        same = False
    if not same:
        raise AdapterNameError("a description in a mix cannot contain '||'")
    return name


def _item(name: str, entry: CatalogEntry) -> CatalogItem:
    return CatalogItem(name=name, model=f"t2l:@{name}", descriptions=[d for d, _ in entry.terms],
                       weights=[w for _, w in entry.terms], mode=entry.mode, strength=entry.strength)


def _bad(e: Exception) -> HTTPException:
    return HTTPException(400, str(e))


# ---- routes ----------------------------------------------------------------------------------

router = APIRouter(prefix="/v1/t2l", tags=["vllm-t2l studio"], route_class=LimitedRoute)
CatalogName = Annotated[str, PathParam(description="letters, digits, '_', '.', '-'; at most 64")]
StudioDep = Annotated[Studio, Depends(_studio)]


@router.get("/info", response_model=Info, summary="The served base model, checkpoint and name limits")
async def info(studio: StudioDep) -> Info:
    r = studio.resolver
    ckpt = r.generator.checkpoint
    s = r.settings
    return Info(base_model=studio.base_model, checkpoint=r.generator.id, trained=ckpt.trained,
                rank=ckpt.config.served_rank, max_chars=s.max_chars, max_terms=s.max_terms,
                max_abs_weight=s.max_abs_weight, max_strength=s.max_strength,
                recommended_strength=ckpt.recommended_strength, catalog_names=len(r.catalog))


@router.get("/catalog", summary="List catalog names")
async def list_catalog(studio: StudioDep) -> dict[str, list[CatalogItem]]:
    return {"data": [_item(n, studio.store.get(n)) for n in sorted(studio.store.entries)]}


@router.get("/catalog/{name}", response_model=CatalogItem, summary="One catalog name")
async def get_catalog(name: CatalogName, studio: StudioDep) -> CatalogItem:
    entry = studio.store.get(name)
    if entry is None:
        raise HTTPException(404, f"catalog name {name[:80]!r} is not in the server's catalog")
    return _item(name, entry)


async def _put(name: str, recipe: Recipe, studio: Studio, response: Response) -> CatalogItem:
    value = recipe.model_dump(exclude={"name", "model"})
    if value["weights"] is None:
        del value["weights"]
    try:
        entry, created = await studio.store.put(name, value)
    except AdapterNameError as e:
        raise _bad(e) from None
    except CatalogWriteError as e:
        raise HTTPException(e.status, str(e)) from None
    studio.forget(name)
    response.status_code = 201 if created else 200
    return _item(name, entry)


@router.put("/catalog/{name}", response_model=CatalogItem, summary="Create or replace a catalog name",
            responses={201: {"description": "created"}, 507: {"description": "catalog disk full"}})
async def put_catalog(recipe: Recipe, response: Response, name: CatalogName, studio: StudioDep) -> CatalogItem:
    return await _put(name, recipe, studio, response)


class NamedRecipe(Recipe):
    name: str


@router.post("/catalog", response_model=CatalogItem, summary="Create or replace a catalog name (name in body)")
async def post_catalog(recipe: NamedRecipe, response: Response, studio: StudioDep) -> CatalogItem:
    return await _put(recipe.name, recipe, studio, response)


@router.delete("/catalog/{name}", summary="Delete a catalog name")
async def delete_catalog(name: CatalogName, studio: StudioDep) -> dict[str, str]:
    try:
        found = await studio.store.delete(name)
    except CatalogWriteError as e:
        raise HTTPException(e.status, str(e)) from None
    if not found:
        raise HTTPException(404, f"catalog name {name[:80]!r} is not in the server's catalog")
    studio.forget(name)
    return {"deleted": name}


@router.post("/adapters", response_model=AdapterInfo, summary="Generate (or look up) an adapter")
async def adapters(req: AdapterRequest, studio: StudioDep) -> AdapterInfo:
    r = studio.resolver
    if (req.model is None) == (req.descriptions is None):
        raise HTTPException(400, "give either 'model' (a t2l name) or 'descriptions'")
    try:
        name = req.model if req.model is not None else _recipe_name(req, studio)
        if not names.is_t2l_name(name):
            raise AdapterNameError("adapter names start with 't2l:' or 't2l-mix:'")
        spec = names.parse(name, r.catalog, r.settings.limits)
    except AdapterNameError as e:
        raise _bad(f"bad adapter name: {e}") from None
    key = spec.content_id(r.generator.id)
    cached = key in r.cache.entries or key in r.cache.retired
    if not req.generate and not cached:
        raise HTTPException(404, f"adapter {key} has not been generated; send generate=true")
    try:
        lora = await r.resolve_lora(studio.base_model, name)
    except AdapterRequestError as e:
        raise HTTPException(400 if str(e).startswith("bad adapter name") else 500, str(e)) from None
    path = Path(lora.lora_path)
    rank = r.generator.rank_of(spec)
    shapes = r.generator.checkpoint.base
    parameters = shapes.n_layers * rank * sum(i + o for i, o in shapes.modules.values())
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return AdapterInfo(id=key, model=name, rank=rank, parameters=parameters, size_bytes=size, cached=cached,
                       descriptions=spec.descriptions, weights=spec.weights, mode=spec.mode,
                       strength=spec.strength, checkpoint=r.generator.id)


def _peft_folder(src: Path, dst: Path) -> None:
    """A PEFT folder for the cached adapter at ``src``: codes folders are expanded into full weights."""
    if (src / codes.CODES_FILE).is_file():
        config = json.loads((src / "adapter_config.json").read_text())
        meta = json.loads((src / METADATA_FILE).read_text())
        lora: LoRAWeights = codes.expand(src, float(config["lora_alpha"]), bool(config.get("use_rslora")))
        meta.pop("basis", None)
        lora.save_peft(dst, config["base_model_name_or_path"], meta)
    else:
        shutil.copytree(src, dst)


def _archive(src: Path, key: str, fmt: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / f"t2l-{key}"
        _peft_folder(src, folder)
        buf = io.BytesIO()
        if fmt == "zip":
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(folder.iterdir()):
                    z.write(f, f"{folder.name}/{f.name}")
        else:
            with tarfile.open(fileobj=buf, mode="w:gz") as t:
                t.add(folder, folder.name)
        return buf.getvalue()


@router.get("/adapters/{adapter_id}/export", summary="Download the adapter as a PEFT folder (zip or tar.gz)",
            response_class=Response, responses={200: {"content": {"application/zip": {}, "application/gzip": {}}}})
async def export(adapter_id: str, studio: StudioDep,
                 format: Annotated[Literal["zip", "tar"], Query()] = "zip") -> Response:
    cache = studio.resolver.cache
    if not KEY.fullmatch(adapter_id):
        raise HTTPException(400, "adapter ids are the hex content ids that POST /v1/t2l/adapters returns")
    if adapter_id not in cache.entries and adapter_id not in cache.retired:
        raise HTTPException(404, f"adapter {adapter_id} is not in the cache; POST /v1/t2l/adapters first")
    try:
        data = await asyncio.to_thread(_archive, cache.path(adapter_id), adapter_id, format)
    except FileNotFoundError:
        raise HTTPException(404, f"adapter {adapter_id} was evicted; POST /v1/t2l/adapters again") from None
    ext, kind = ("zip", "application/zip") if format == "zip" else ("tar.gz", "application/gzip")
    return Response(data, media_type=kind,
                    headers={"Content-Disposition": f'attachment; filename="t2l-{adapter_id}.{ext}"'})


page = APIRouter(include_in_schema=False)


@page.get("/t2l")
async def page_redirect() -> RedirectResponse:
    return RedirectResponse("/t2l/")


@page.get("/t2l/")
async def page_index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@page.get("/t2l/{file}")
async def page_file(file: str) -> FileResponse:
    if file not in PAGE_FILES:
        raise HTTPException(404, "not a studio file")
    return FileResponse(STATIC / file, media_type=PAGE_FILES[file])


# ---- the endpoint plugin ---------------------------------------------------------------------

class StudioPlugin:
    """The ``vllm.endpoint_plugins`` entry: vLLM calls ``attach_router`` while it builds the app and
    ``init_state`` once its model registry exists."""

    name = "vllm_t2l_studio"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(router)
        app.include_router(page)

    async def init_state(self, engine_client, state, args: Namespace) -> None:
        from vllm_t2l.serving import plugin

        resolver = plugin.resolver()
        models = getattr(state, "openai_serving_models", None)
        if resolver is None or models is None or resolver.generator is None:
            log.warning("vllm-t2l: studio routes answer 503: the resolver is not started (is --enable-lora on?)")
            return
        studio = Studio(resolver, models)
        studio.start()
        state.t2l_studio = studio
