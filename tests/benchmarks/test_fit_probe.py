import re

import pytest
from safetensors.torch import load_file

from benchmarks.diagnostics.fit_probe import main
from vllm_t2l.models import DEFAULT_CHECKPOINT

SIGNOFF = [str(DEFAULT_CHECKPOINT), "End every reply with the word Cheers.", "--style", "signoff", "--param", "Cheers"]
SMALL = ["--train-queries", "2", "--batch-size", "2", "--answer-tokens", "12", "--queries", "1", "--max-tokens", "4"]


def test_fit_none_scores_the_served_adapter_without_training(capsys):
    main(SIGNOFF + SMALL + ["--fit", "none"])
    out = capsys.readouterr().out
    assert "step " not in out
    assert "signoff (ends_with, param Cheers) at strength 2, the served adapter: held-out 0.00 (base model" in out


@pytest.mark.parametrize("fit", ["codes", "lora"])
def test_a_fit_lowers_the_loss_on_the_tokens_the_rule_wrote_and_is_saved(capsys, tmp_path, fit):
    main(SIGNOFF + SMALL + ["--fit", fit, "--steps", "25", "--lr", "0.05" if fit == "codes" else "0.005",
                            "--save", str(tmp_path / "fit.safetensors")])
    ruled = [float(x) for x in re.findall(r"on the rule's tokens ([0-9.]+)", capsys.readouterr().out)]
    assert len(ruled) == 2 and ruled[1] < ruled[0]
    saved = load_file(tmp_path / "fit.safetensors")
    if fit == "codes":  # 30 layers x (8 ranks of the first network + 8 of the follow network)
        assert {k: tuple(v.shape) for k, v in saved.items()} == {"codes.q_proj": (30, 16), "codes.v_proj": (30, 16)}
    else:
        assert sorted(saved) == ["A.q_proj", "A.v_proj", "B.q_proj", "B.v_proj"]
        assert saved["B.v_proj"].shape == (30, 192, 16)


def test_a_counting_style_needs_a_whole_number():
    with pytest.raises(SystemExit, match="--style lines needs --param"):
        main([str(DEFAULT_CHECKPOINT), "Reply in two lines.", "--style", "lines"])
    with pytest.raises(SystemExit, match="a positive whole number, not 'two'"):
        main([str(DEFAULT_CHECKPOINT), "Reply in two lines.", "--style", "lines", "--param", "two"])

