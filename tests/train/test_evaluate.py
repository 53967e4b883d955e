from vllm_t2l.train.evaluate import setup_name, write_report


def _row(kl: float, gap: float, n_checked: int = 2) -> dict:
    return {"kl": kl, "gap_closed": gap, "compliance": 0.0 if n_checked else float("nan"), "n_checked": n_checked,
            "n": 4}


def test_report_names_every_checkpoint(tmp_path):
    result = {
        "all": {"base (no prompt)": _row(0.12, 0.0), "generated adapter": _row(0.06, 0.5),
                "generated adapter, t2l-L (4.57M)": _row(0.07, 0.4, n_checked=0)},
        "context_tokens_saved_per_request": 11.4,
        "checkpoint": {"arch": "zhyper-diag", "params": 1000},
        "checkpoints": {"generated adapter": {"path": "a/ckpt", "id": "abc", "steps": 700},
                        "generated adapter, t2l-L (4.57M)": {"path": "b/ckpt", "id": "def"}},
    }
    write_report(result, tmp_path)
    md = (tmp_path / "quality.md").read_text()
    assert "| generated adapter | 0.0600 | 50.0% | 0.0% (2) | 4 |" in md
    assert "| generated adapter, t2l-L (4.57M) | 0.0700 | 40.0% | not measured | 4 |" in md  # eval --no-compliance
    assert "| generated adapter | `a/ckpt` | abc | 700 |" in md
    assert "| generated adapter, t2l-L (4.57M) | `b/ckpt` | def | ? |" in md
    assert (tmp_path / "quality.png").exists()


def test_report_breaks_the_gap_down_by_family(tmp_path):
    base, gen, oracle, ctx = _row(0.12, 0.0), _row(0.06, 0.5), _row(0.03, 0.75), _row(0.0, 1.0)
    empty = {**oracle, "n": 0}
    result = {
        "all": {"base (no prompt)": base, "generated adapter": gen, "oracle LoRA": oracle},
        "families": {"persona": {"base (no prompt)": base, "generated adapter": gen, "oracle LoRA": oracle,
                                 "prompt in context": ctx},
                     "tone": {"base (no prompt)": base, "generated adapter": _row(0.09, 0.25), "oracle LoRA": empty}},
        "context_tokens_saved_per_request": 11.4, "checkpoint": {"arch": "zhyper-diag", "params": 1000},
    }
    write_report(result, tmp_path)
    md = (tmp_path / "quality.md").read_text()
    assert "| family | samples | generated adapter | oracle LoRA |" in md
    assert "| persona | 4 | 50.0% | 75.0% |" in md and "| tone | 4 | 25.0% | - |" in md
    assert "## families" not in md


def test_compared_checkpoints_of_one_size_keep_their_own_rows():
    info = {"arch": "zhyper-diag", "params": 1_080_000}
    taken = {"generated adapter": 0}
    for i in (1, 2):
        taken[setup_name(i, info, taken)] = i
    assert list(taken) == ["generated adapter", "generated adapter, zhyper-diag (1.08M)",
                           "generated adapter, zhyper-diag (1.08M) #2"]
