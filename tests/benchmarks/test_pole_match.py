import pytest

from benchmarks.diagnostics.pole_match import POLE, main, minilm_cut, pole_closeness
from benchmarks.follow import load_descriptions
from vllm_t2l.generator import Generator
from vllm_t2l.models import DEFAULT_CHECKPOINT
from vllm_t2l.train.data import load_dials


def test_every_follow_behaviour_has_a_dial_pole():
    assert set(POLE) == {r["behaviour"] for r in load_descriptions()}
    assert set(POLE.values()) <= {p["style"] for p in load_dials()}


def test_pole_closeness_gives_every_text_one_cosine_per_pole_and_main_counts_them(capsys):
    texts = ["Answer like a pirate on the open sea.", "Reply in all capital letters."]
    names, closeness = pole_closeness(Generator.load(DEFAULT_CHECKPOINT).embedder, texts)
    assert names == [p["style"] for p in load_dials()] and closeness.shape == (2, len(names))
    main([str(DEFAULT_CHECKPOINT)])
    out = capsys.readouterr().out
    assert f"of {len(load_descriptions())} nearest their own pole" in out


def test_a_cut_minilm_embeds_like_a_checkpoint_and_is_reported(tmp_path, capsys):
    cut = minilm_cut(1, str(tmp_path / "cut"))
    assert cut.model[0].auto_model.config.num_hidden_layers == 1
    assert cut(["Talk like a pirate."]).shape == (1, 384)
    main(["--minilm-layers", "1", "--wordings", "Talk like a pirate."])
    out = capsys.readouterr().out
    assert "MiniLM, first 1 of 6 layers: " in out and "'Talk like a pirate.': " in out


def test_minilm_layers_out_of_range_is_one_line():
    with pytest.raises(SystemExit, match="layers 1 to 6, not 7"):
        main(["--minilm-layers", "7"])


def test_idf_weights_are_reported_beside_the_checkpoints_embedder(capsys):
    main([str(DEFAULT_CHECKPOINT), "--idf", "1"])
    out = capsys.readouterr().out
    assert f"{DEFAULT_CHECKPOINT}, description-idf ** 1: " in out


def test_nothing_to_ask_is_one_line():
    with pytest.raises(SystemExit, match="name a checkpoint, or --minilm-layers K"):
        main(["--idf", "1"])
