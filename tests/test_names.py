"""Tests for vllm_t2l.names: the adapter-name grammar, normalisation, content ids and validation."""

from __future__ import annotations

import json

import pytest

from vllm_t2l.names import (
    AdapterNameError,
    AdapterSpec,
    NameLimits,
    is_t2l_name,
    load_catalog,
    normalise,
    parse,
    spec_from_parts,
)

CATALOG = {"pirate": "Talk like a pirate.", "b": "Be   brief\tplease.", "x.y-z_1": "dotted name"}
CK = "0123456789abcdef"


# ---- grammar -----------------------------------------------------------------------------------

def test_inline_description():
    spec = parse("t2l:Answer like a pirate.")
    assert spec == AdapterSpec((("Answer like a pirate.", 1.0),), "weight")
    assert spec.descriptions == ["Answer like a pirate."] and spec.weights == [1.0]


def test_inline_keeps_special_characters():
    # '||' and '*' only mean something after t2l-mix
    assert parse("t2l:a||b * c").descriptions == ["a||b * c"]


def test_catalog_name():
    assert parse("t2l:@pirate", CATALOG).terms == (("Talk like a pirate.", 1.0),)
    assert parse("t2l:@x.y-z_1", CATALOG).descriptions == ["dotted name"]
    # catalog descriptions are normalised too
    assert parse("t2l:@b", CATALOG).descriptions == ["Be brief please."]


def test_mix_default_mode():
    spec = parse("t2l-mix:0.7*a||0.3*@b", CATALOG)
    assert spec.mode == "weight"
    assert spec.terms == (("a", 0.7), ("Be brief please.", 0.3))


@pytest.mark.parametrize("mode", ["emb", "weight"])
def test_mix_explicit_mode(mode):
    spec = parse(f"t2l-mix[{mode}]: 0.5 * first thing || -0.25*second", CATALOG)
    assert spec.mode == mode
    assert spec.terms == (("first thing", 0.5), ("second", -0.25))


def test_mix_single_term_and_description_with_star():
    assert parse("t2l-mix:2*x*y").terms == (("x*y", 2.0),)


def test_mix_weights_forms():
    spec = parse("t2l-mix:1e-1*a||-.5*b||+1*c||2*d")
    assert spec.weights == [0.1, -0.5, 1.0, 2.0]


def test_is_t2l_name():
    assert is_t2l_name("t2l:x") and is_t2l_name("t2l-mix:1*x") and is_t2l_name("t2l-mix[emb]:1*x")
    assert not is_t2l_name("base-model") and not is_t2l_name("T2L:x") and not is_t2l_name("my-t2l:x")


# ---- normalisation -----------------------------------------------------------------------------

def test_nfc():
    decomposed, composed = "caf" + "e\u0301", "caf\u00e9"
    assert decomposed != composed
    assert normalise(decomposed) == composed
    a, b = parse("t2l:" + decomposed), parse("t2l:" + composed)
    assert a == b and a.content_id(CK) == b.content_id(CK)


def test_whitespace_collapse():
    assert normalise("  be \t  brief\n\nplease \r\n") == "be brief please"
    ids = {parse(n).content_id(CK) for n in
           ["t2l:be brief", "t2l:  be   brief ", "t2l:be\tbrief", "t2l:be\nbrief", "t2l:\tbe \n brief\n"]}
    assert len(ids) == 1
    assert parse("t2l-mix:0.5*  be\tbrief ||0.5*x").descriptions == ["be brief", "x"]


def test_content_id_stable_and_sensitive():
    spec = parse("t2l-mix:0.7*a||0.3*b")
    cid = spec.content_id(CK)
    assert cid == parse("t2l-mix:0.7*a||0.3*b").content_id(CK)
    assert cid == parse("t2l-mix:0.70 * a || .3*b").content_id(CK)  # same numbers, same text
    assert len(cid) == 32 and all(c in "0123456789abcdef" for c in cid)
    others = [
        spec.content_id("fedcba9876543210"),  # another checkpoint
        parse("t2l-mix[emb]:0.7*a||0.3*b").content_id(CK),  # another mode
        parse("t2l-mix:0.6*a||0.3*b").content_id(CK),  # another weight
        parse("t2l-mix:0.3*b||0.7*a").content_id(CK),  # order
        parse("t2l-mix:0.7*a||0.3*c").content_id(CK),  # another description
        parse("t2l-mix:0.7*A||0.3*b").content_id(CK),  # case matters
        parse("t2l:a").content_id(CK),
    ]
    assert len({cid, *others}) == len(others) + 1


def test_content_id_literal_value():
    """Pinned: replicas and restarts must agree on the id of the same request."""
    import hashlib

    spec = parse("t2l:hello")
    payload = json.dumps([CK, "weight", [["hello", "1.0"]]])
    assert spec.content_id(CK) == hashlib.sha256(payload.encode()).hexdigest()[:32]


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,msg", [
    ("t2l:", "empty"),
    ("t2l:   \t\n ", "empty"),
    ("t2l-mix:0.5*   ||0.5*a", "empty"),
    ("t2l:a\x00b", "U+0000"),
    ("t2l:a\x1b[31mred", "U+001B"),
    ("t2l:zero\u200bwidth", "U+200B"),
    ("t2l:bidi\u202eoverride", "U+202E"),
    ("t2l:surrogate\ud800", "U+D800"),
    ("t2l:bell\x07", "U+0007"),
    ("", "start with"),
    ("gpt-4", "start with"),
    ("t2l-mix[avg]:1*a", "unknown option 'avg'"),
    ("t2l[emb]:a", "use 'strength=<number>'"),
    ("t2l[strength=0]:a", "outside (0, 4.0]"),
    ("t2l[strength=-1]:a", "outside (0, 4.0]"),
    ("t2l[strength=9]:a", "outside (0, 4.0]"),
    ("t2l[strength=nan]:a", "outside"),
    ("t2l[strength=two]:a", "'two' is not a number"),
    ("t2l[strength=2:a", "start with"),
    ("t2l-mix 1*a", "start with"),
    ("t2l-mix:a||0.5*b", "term 1 needs the form"),
    ("t2l-mix:0.5*a||b", "term 2 needs the form"),
    ("t2l-mix:", "term 1 needs the form"),
    ("t2l-mix:half*a", "'half' is not a number"),
    ("t2l-mix:*a", "is not a number"),
    ("t2l-mix:0.5*a||1/2*b", "term 2: weight '1/2' is not a number"),
    ("t2l-mix:nan*a", "finite"),
    ("t2l-mix:inf*a", "finite"),
    ("t2l-mix:-inf*a", "finite"),
    ("t2l-mix:1e999*a", "finite"),
    ("t2l-mix:2.5*a", "outside [-2.0, 2.0]"),
    ("t2l-mix:0.5*a||-3*b", "term 2: weight -3.0 is outside"),
    ("t2l:@nobody", "'nobody' is not in the server's catalog"),
    ("t2l:@", "malformed"),
    ("t2l:@../etc/passwd", "malformed"),
    ("t2l:@has space", "malformed"),
    ("t2l-mix:1*@-dash", "malformed"),
    ("t2l:@" + "a" * 65, "malformed"),
])
def test_errors(name, msg):
    with pytest.raises(AdapterNameError) as e:
        parse(name, CATALOG)
    assert msg in str(e.value)


def test_error_is_value_error():
    assert issubclass(AdapterNameError, ValueError)


def test_tabs_and_newlines_are_not_control_errors():
    assert parse("t2l:a\tb\nc\rd").descriptions == ["a b c d"]


def test_too_long_default_and_configurable():
    parse("t2l:" + "a" * 2000)
    with pytest.raises(AdapterNameError, match="2001 characters; the limit is 2000"):
        parse("t2l:" + "a" * 2001)
    small = NameLimits(max_chars=10)
    parse("t2l:" + "a" * 10, limits=small)
    parse("t2l:  a    b  c  ", limits=NameLimits(max_chars=5))  # counted after normalisation
    with pytest.raises(AdapterNameError, match="limit is 10"):
        parse("t2l:" + "a" * 11, limits=small)
    with pytest.raises(AdapterNameError, match="limit is 10"):
        parse("t2l-mix:0.5*ok||0.5*" + "b" * 11, limits=small)
    with pytest.raises(AdapterNameError, match="limit is 10"):
        parse("t2l:@long", {"long": "c" * 11}, limits=small)


def test_too_many_terms():
    body = "||".join(f"0.1*d{i}" for i in range(8))
    assert len(parse("t2l-mix:" + body).terms) == 8
    with pytest.raises(AdapterNameError, match="9 terms; the limit is 8"):
        parse("t2l-mix:" + body + "||0.1*d8")
    with pytest.raises(AdapterNameError, match="3 terms; the limit is 2"):
        parse("t2l-mix:1*a||1*b||1*c", limits=NameLimits(max_terms=2))


def test_weight_limit_configurable():
    assert parse("t2l-mix:2*a").weights == [2.0]
    assert parse("t2l-mix:-2*a").weights == [-2.0]
    assert parse("t2l-mix:5*a", limits=NameLimits(max_abs_weight=5)).weights == [5.0]
    with pytest.raises(AdapterNameError, match="outside"):
        parse("t2l-mix:1.01*a", limits=NameLimits(max_abs_weight=1.0))


# ---- spec_from_parts ---------------------------------------------------------------------------

def test_spec_from_parts_equals_parse():
    assert spec_from_parts(["a", "@b"], [0.7, 0.3], catalog=CATALOG) == parse("t2l-mix:0.7*a||0.3*@b", CATALOG)
    assert spec_from_parts(["a", "b"], [0.5, 0.5], mode="emb") == parse("t2l-mix[emb]:0.5*a||0.5*b")
    assert spec_from_parts(["  x  y "]) == parse("t2l:x y")
    assert spec_from_parts(["a", "b"]) == parse("t2l-mix:1*a||1*b")
    assert spec_from_parts(["@pirate"], catalog=CATALOG) == parse("t2l:@pirate", CATALOG)
    weird = 0.1 + 0.2  # repr must round-trip exactly
    assert spec_from_parts(["a"], [weird]).weights == [weird]


def test_spec_from_parts_errors():
    with pytest.raises(AdapterNameError, match="2 weights for 1 descriptions"):
        spec_from_parts(["a"], [0.5, 0.5])
    with pytest.raises(AdapterNameError, match="1 weights for 2 descriptions"):
        spec_from_parts(["a", "b"], [1.0])
    with pytest.raises(AdapterNameError, match="mode"):
        spec_from_parts(["a"], mode="avg")  # type: ignore[arg-type]
    with pytest.raises(AdapterNameError, match="finite"):
        spec_from_parts(["a"], [float("nan")])
    with pytest.raises(AdapterNameError, match="outside"):
        spec_from_parts(["a"], [3.0])
    with pytest.raises(AdapterNameError, match="empty"):
        spec_from_parts([" "])


def test_spec_from_parts_description_with_separator():
    assert spec_from_parts(["a||b"]) == parse("t2l:a||b")


# ---- catalog files -----------------------------------------------------------------------------

def test_load_catalog_ok(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(CATALOG), encoding="utf-8")
    assert load_catalog(p) == CATALOG
    assert load_catalog(str(p)) == CATALOG


@pytest.mark.parametrize("content,msg", [
    (json.dumps(["a", "b"]), "must be a JSON object"),
    (json.dumps("text"), "must be a JSON object"),
    (json.dumps({"bad name": "x"}), "'bad name' is malformed"),
    (json.dumps({"../up": "x"}), "'../up' is malformed"),
    (json.dumps({"": "x"}), "'' is malformed"),
    (json.dumps({"ok": 3}), "description of 'ok' is not a string"),
    (json.dumps({"ok": None}), "description of 'ok' is not a string"),
    (json.dumps({"ok": "   "}), "empty"),
    (json.dumps({"ok": "esc\x1b"}), "U+001B"),
    ("{not json", ""),
])
def test_load_catalog_errors(tmp_path, content, msg):
    p = tmp_path / "c.json"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_catalog(p)
    assert msg in str(e.value)


# ---- strength ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,mode,strength", [
    ("t2l[strength=2]:Be kind.", "weight", 2.0),
    ("t2l[ strength = 0.5 ]:Be kind.", "weight", 0.5),
    ("t2l-mix[strength=3]:1*Be kind.", "weight", 3.0),
    ("t2l-mix[emb,strength=1.5]:1*Be kind.", "emb", 1.5),
    ("t2l-mix[strength=1.5,emb]:1*Be kind.", "emb", 1.5),
    ("t2l:Be kind.", "weight", 1.0),
])
def test_strength_option(name, mode, strength):
    spec = parse(name)
    assert (spec.descriptions, spec.mode, spec.strength) == (["Be kind."], mode, strength)


def test_strength_enters_the_content_id_but_one_keeps_the_old_id():
    plain = parse("t2l:Be kind.")
    assert parse("t2l[strength=1]:Be kind.").content_id(CK) == plain.content_id(CK)
    ids = {parse(f"t2l[strength={s}]:Be kind.").content_id(CK) for s in (0.5, 2, 3)}
    assert len(ids) == 3 and plain.content_id(CK) not in ids


def test_description_after_plain_prefix_may_hold_brackets():
    assert parse("t2l:[strength=2]: is text").descriptions == ["[strength=2]: is text"]
    assert is_t2l_name("t2l[strength=2]:a")


def test_strength_limit_configurable_and_in_spec_from_parts():
    assert parse("t2l[strength=6]:a", limits=NameLimits(max_strength=8)).strength == 6
    assert spec_from_parts(["a"], strength=2) == parse("t2l[strength=2]:a")
    with pytest.raises(AdapterNameError, match="outside"):
        spec_from_parts(["a"], strength=0)


# ---- saved mixes in the catalog ----------------------------------------------------------------

def test_catalog_entry_mix_and_strength():
    from vllm_t2l.names import CatalogEntry, catalog_entry

    cat = {"ab": catalog_entry({"descriptions": ["a", " b "], "weights": [0.5, 0.25], "strength": 2}),
           "e": catalog_entry({"descriptions": ["a", "b"], "mode": "emb"}), "p": "plain",
           "s": catalog_entry({"descriptions": ["a"], "strength": 2})}
    assert cat["ab"] == CatalogEntry((("a", 0.5), ("b", 0.25)), "weight", 2.0)
    assert parse("t2l:@ab", cat) == parse("t2l-mix[strength=2]:0.5*a||0.25*b")
    assert parse("t2l[strength=1.5]:@ab", cat).strength == 3.0
    # inside a weight mix the entry's strength folds into its weights (exact: the update is linear)
    assert parse("t2l-mix:1*@ab||1*@p", cat).terms == (("a", 1.0), ("b", 0.5), ("plain", 1.0))
    assert parse("t2l-mix[emb]:0.5*@e||0.5*c", cat).terms == (("a", 0.5), ("b", 0.5), ("c", 0.5))
    with pytest.raises(AdapterNameError, match=r"\[emb\] mix"):
        parse("t2l-mix:1*@e", cat)
    with pytest.raises(AdapterNameError, match="strength 2"):
        parse("t2l-mix[emb]:1*@s", cat)
    with pytest.raises(AdapterNameError, match="outside"):
        parse("t2l[strength=3]:@ab", cat)
    with pytest.raises(AdapterNameError, match="once its catalog names are expanded"):
        parse("t2l-mix:" + "||".join(["1*@ab"] * 5), cat)


def test_load_catalog_with_entries(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"a": "plain", "m": {"descriptions": ["x", "y"], "weights": [1, -1]}}))
    loaded = load_catalog(p)
    assert loaded["a"] == "plain" and loaded["m"].terms == (("x", 1.0), ("y", -1.0))
    p.write_text(json.dumps({"m": {"descriptions": []}}))
    with pytest.raises(ValueError, match="entry 'm' needs 'descriptions'"):
        load_catalog(p)
