"""Adapter names: parse, normalise and validate the ``model`` field of a request.

Grammar (documented in README.md):

    t2l:<description>                      an inline description
    t2l:@<catalog-name>                    a description, or a saved mix, from the server's catalog file
    t2l-mix:<w>*<term>||<w>*<term>...      a weighted mix; each term is a description or @name
    t2l-mix[emb]:...                       the same mix, in description (embedding) space
    t2l[strength=S]:<description>          the adapter's update scaled by S (also t2l-mix[emb,strength=S]:)

Strength 1 is the alignment prompt: the adapter does what the description does as a system prompt.
Larger values follow the description more strongly (the update is exactly S times larger).

The content id of a spec hashes the normalised descriptions, the weights, the mode and the
checkpoint id, so every replica maps the same request to the same adapter without talking.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PREFIX = "t2l:"
MIX_PREFIX = "t2l-mix"
CATALOG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
HEAD = re.compile(r"^(t2l|t2l-mix)(?:\[([^\]]*)\])?:")
Mode = Literal["weight", "emb"]


class AdapterNameError(ValueError):
    """A request's adapter name is malformed; the message says what to fix."""


@dataclass(frozen=True)
class NameLimits:
    max_chars: int = 2000  # per description, after normalisation
    max_terms: int = 8
    max_abs_weight: float = 2.0
    max_strength: float = 4.0


@dataclass(frozen=True)
class CatalogEntry:
    """A saved recipe behind ``t2l:@name`` when it is more than one description: a mix and a strength.

    In the catalog file a plain string still means one description; an object holds
    ``{"descriptions": [...], "weights": [...], "mode": "weight"|"emb", "strength": S}``.
    """

    terms: tuple[tuple[str, float], ...]
    mode: Mode = "weight"
    strength: float = 1.0

    @property
    def plain(self) -> bool:
        return len(self.terms) == 1 and self.terms[0][1] == 1.0 and self.mode == "weight" and self.strength == 1.0

    def to_json(self) -> str | dict:
        if self.plain:
            return self.terms[0][0]
        return {"descriptions": [d for d, _ in self.terms], "weights": [w for _, w in self.terms],
                "mode": self.mode, "strength": self.strength}


Catalog = Mapping[str, "str | CatalogEntry"]


def catalog_entry(value: object, limits: NameLimits = NameLimits()) -> CatalogEntry:
    """A catalog value (a string, or an object as in ``CatalogEntry``) checked and normalised."""
    if isinstance(value, CatalogEntry):
        value = value.to_json()
    if isinstance(value, str):
        return CatalogEntry(((normalise(value, limits), 1.0),))
    if not isinstance(value, dict):
        raise AdapterNameError("is not a string or an object")
    unknown = sorted(set(value) - {"descriptions", "weights", "mode", "strength"})
    if unknown:
        raise AdapterNameError(f"has unknown fields {unknown}")
    descriptions = value.get("descriptions")
    if not isinstance(descriptions, list) or not descriptions or not all(isinstance(d, str) for d in descriptions):
        raise AdapterNameError("needs 'descriptions': a non-empty list of strings")
    weights = value.get("weights", [1.0] * len(descriptions))
    if not isinstance(weights, list) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                for w in weights):
        raise AdapterNameError("'weights' must be a list of numbers")
    if any(d.lstrip().startswith("@") for d in descriptions):
        raise AdapterNameError("descriptions of a catalog entry cannot name other catalog entries")
    spec = spec_from_parts(descriptions, [float(w) for w in weights], value.get("mode", "weight"), None, limits,
                           value.get("strength", 1.0))
    return CatalogEntry(spec.terms, spec.mode, spec.strength)


@dataclass(frozen=True)
class AdapterSpec:
    """What to generate: normalised descriptions with weights, and how to mix them."""

    terms: tuple[tuple[str, float], ...]
    mode: Mode = "weight"
    strength: float = 1.0  # the served update is strength * sum_i w_i dW_i

    @property
    def descriptions(self) -> list[str]:
        return [d for d, _ in self.terms]

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.terms]

    def content_id(self, checkpoint_id: str) -> str:
        parts = [checkpoint_id, self.mode, [[d, repr(float(w))] for d, w in self.terms]]
        if self.strength != 1.0:  # strength 1 keeps the ids adapters had before strength existed
            parts.append(repr(float(self.strength)))
        payload = json.dumps(parts)
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


def is_t2l_name(name: str) -> bool:
    return name.startswith(PREFIX) or name.startswith("t2l[") or name.startswith(MIX_PREFIX)


def normalise(text: str, limits: NameLimits = NameLimits()) -> str:
    """Unicode NFC, whitespace runs collapsed to one space, trimmed; rejects what cannot be a text."""
    text = unicodedata.normalize("NFC", text)
    bad = sorted({f"U+{ord(c):04X}" for c in text
                  if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") and not c.isspace()})
    if bad:
        raise AdapterNameError(f"description contains control or unassigned characters: {', '.join(bad)}")
    text = " ".join(text.split())
    if not text:
        raise AdapterNameError("description is empty")
    if len(text) > limits.max_chars:
        raise AdapterNameError(f"description is {len(text)} characters; the limit is {limits.max_chars}")
    return text


def _lookup(term: str, catalog: Catalog) -> tuple[str, str | CatalogEntry]:
    key = term[1:].strip()
    if not CATALOG_NAME.match(key):
        raise AdapterNameError(f"catalog name {key[:40]!r} is malformed: use letters, digits, '_', '.', '-'")
    if key not in catalog:
        raise AdapterNameError(f"catalog name {key[:40]!r} is not in the server's catalog")
    return key, catalog[key]


def _terms(term: str, weight: float, mode: Mode, catalog: Catalog, limits: NameLimits) -> list[tuple[str, float]]:
    """The (description, weight) pairs one mix term stands for; a saved mix expands into its own terms.

    Expanding is exact because both mixes are linear: in weight space the entry's strength folds into its
    weights; in description space only an entry that is itself a description-space mix at strength 1 fits.
    """
    if not term.startswith("@"):
        return [(normalise(term, limits), weight)]
    key, value = _lookup(term, catalog)
    if isinstance(value, str):
        return [(normalise(value, limits), weight)]
    if len(value.terms) > 1 and value.mode != mode:
        raise AdapterNameError(f"catalog name {key!r} is a [{value.mode}] mix; use it alone or in a "
                               f"t2l-mix[{value.mode}]")
    if value.strength != 1.0 and mode == "emb":
        raise AdapterNameError(f"catalog name {key!r} has strength {value.strength:g}, which a t2l-mix[emb] "
                               "cannot fold in; use it alone or in a weight-space mix")
    scale = weight * (value.strength if mode == "weight" else 1.0)
    return [(normalise(d, limits), scale * w) for d, w in value.terms]


def parse(name: str, catalog: Catalog | None = None,
          limits: NameLimits = NameLimits()) -> AdapterSpec:
    catalog = catalog or {}
    head = HEAD.match(name)
    if not head:
        raise AdapterNameError("adapter names start with 't2l:' or 't2l-mix:' "
                               "(options in brackets: 't2l[strength=2]:', 't2l-mix[emb]:')")
    mix = head.group(1) == MIX_PREFIX
    mode, strength = _options(head.group(2), mix, limits)
    body = name[head.end():]
    if not mix:
        if body.startswith("@"):
            key, value = _lookup(body, catalog)
            if isinstance(value, CatalogEntry):
                entry = catalog_entry(value, limits)
                return AdapterSpec(entry.terms, entry.mode, check_strength(entry.strength * strength, limits))
        return AdapterSpec(tuple(_terms(body, 1.0, "weight", catalog, limits)), strength=strength)
    raw_terms = [raw.partition("*") for raw in body.split("||")]
    for i, (_, star, _) in enumerate(raw_terms, 1):
        if not star:
            raise AdapterNameError(f"mix term {i} needs the form '<weight>*<description>'")
    return _spec([(w, text) for w, _, text in raw_terms], mode, catalog, limits, strength)


def _options(text: str | None, mix: bool, limits: NameLimits) -> tuple[Mode, float]:
    """The bracketed options of a name: a mix's mode (weight or emb) and strength=S."""
    mode: Mode = "weight"
    strength = 1.0
    for option in (text or "").split(",") if text is not None else []:
        option = option.strip()
        key, eq, value = option.partition("=")
        if mix and not eq and option in ("weight", "emb"):
            mode = option  # type: ignore[assignment]
        elif eq and key.strip() == "strength":
            strength = check_strength(value.strip(), limits)
        else:
            allowed = "'weight', 'emb' or 'strength=<number>'" if mix else "'strength=<number>'"
            raise AdapterNameError(f"unknown option {option[:40]!r} in brackets: use {allowed}")
    return mode, strength


def check_strength(value: str | float, limits: NameLimits = NameLimits()) -> float:
    """A strength as a float in (0, max_strength]; 0 would be the base model, which needs no adapter."""
    try:
        strength = float(value)
    except ValueError:
        raise AdapterNameError(f"strength {str(value)[:40]!r} is not a number") from None
    if not (math.isfinite(strength) and 0 < strength <= limits.max_strength):
        raise AdapterNameError(f"strength {value} is outside (0, {limits.max_strength}]")
    return strength


def _spec(raw_terms: list[tuple[str, str]], mode: Mode, catalog: Catalog,
          limits: NameLimits, strength: float = 1.0) -> AdapterSpec:
    if len(raw_terms) > limits.max_terms:
        raise AdapterNameError(f"mix has {len(raw_terms)} terms; the limit is {limits.max_terms}")
    terms = []
    for i, (weight_text, text) in enumerate(raw_terms, 1):
        weight_text = weight_text.strip()
        try:
            weight = float(weight_text)
        except ValueError:
            raise AdapterNameError(
                f"mix term {i}: weight {weight_text[:40]!r} is not a number") from None
        if not math.isfinite(weight):
            raise AdapterNameError(f"mix term {i}: weight must be finite, got {weight_text[:40]}")
        if abs(weight) > limits.max_abs_weight:
            bound = limits.max_abs_weight
            raise AdapterNameError(f"mix term {i}: weight {weight} is outside [-{bound}, {bound}]")
        terms += _terms(text, weight, mode, catalog, limits)
    if len(terms) > limits.max_terms:
        raise AdapterNameError(f"mix has {len(terms)} terms once its catalog names are expanded; "
                               f"the limit is {limits.max_terms}")
    return AdapterSpec(tuple(terms), mode, strength)


def spec_from_parts(descriptions: list[str], weights: list[float] | None = None,
                    mode: Mode = "weight", catalog: Catalog | None = None,
                    limits: NameLimits = NameLimits(), strength: float = 1.0) -> AdapterSpec:
    """The spec a name would give, from already separated parts (the CLI and Python API use this)."""
    if weights is None:
        weights = [1.0] * len(descriptions)
    if len(weights) != len(descriptions):
        raise AdapterNameError(f"got {len(weights)} weights for {len(descriptions)} descriptions")
    if mode not in ("weight", "emb"):
        raise AdapterNameError(f"mode must be 'weight' or 'emb', got {mode!r}")
    return _spec([(str(w), d) for d, w in zip(descriptions, weights)], mode, catalog or {}, limits,
                 check_strength(strength, limits))


def load_catalog(path: str | Path) -> dict[str, str | CatalogEntry]:
    """A JSON object {name: description or entry object}; checked once at start so bad entries fail loudly."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"catalog {path} must be a JSON object of name -> description")
    out: dict[str, str | CatalogEntry] = {}
    for key, value in data.items():
        if not CATALOG_NAME.match(key):
            raise ValueError(f"catalog {path}: name {key!r} is malformed")
        if isinstance(value, str):
            normalise(value)
            out[key] = value
        elif isinstance(value, dict):
            try:
                out[key] = catalog_entry(value)
            except AdapterNameError as e:
                raise ValueError(f"catalog {path}: entry {key!r} {e}") from None
        else:
            raise ValueError(f"catalog {path}: description of {key!r} is not a string or an object")
    return out
