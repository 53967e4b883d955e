import re

from benchmarks.diagnostics.copy_probe import main
from vllm_t2l.models import DEFAULT_CHECKPOINT


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
