import random
import re

from transformers import AutoTokenizer

from benchmarks.diagnostics.copy_probe import main, vocabulary_rows
from vllm_t2l.models import DEFAULT_CHECKPOINT, prepare_default_model


def test_the_copy_path_trains_and_scores_training_and_held_out_words(capsys):
    main([str(DEFAULT_CHECKPOINT), "--steps", "25", "--lr", "0.05", "--train-queries", "2", "--queries", "1",
          "--answer-tokens", "8", "--max-tokens", "4", "--batch-size", "2"])
    out = capsys.readouterr().out
    ruled = [float(x) for x in re.findall(r"on the rule's tokens ([0-9.]+)", out)]
    assert len(ruled) == 2
    scored = re.findall(r"^(training|held-out) word '(\w+)' .*: ends with it ([0-9.]+) with the copy path, "
                        r"([0-9.]+) served", out, re.MULTILINE)
    assert [kind for kind, *_ in scored] == ["training"] * 4 + ["held-out"] * 4
    assert [word for kind, word, *_ in scored if kind == "held-out"] == ["Bazinga", "Namaste", "Cheerio", "Amen"]
    # The served adapters of the benchmark's sign-offs end with no word (the gap this probe measures).
    assert all(float(served) == 0 for *_, served in scored[4:])


def test_vocabulary_rows_put_new_words_into_the_poles_wordings():
    pole = [("End every reply with the word Cheers.", "Cheers"), ("Always sign off with Adieu.", "Adieu")]
    rows = vocabulary_rows(AutoTokenizer.from_pretrained(prepare_default_model()), pole, {"bazinga"}, 50,
                           random.Random(0))
    assert len(rows) == 50 and len({w for _, w in rows}) == 50
    for wording, word in rows:
        assert wording in (f"End every reply with the word {word}.", f"Always sign off with {word}.")
        assert word.isalpha() and word[0].isupper() and word.lower() not in ("cheers", "adieu", "bazinga")
