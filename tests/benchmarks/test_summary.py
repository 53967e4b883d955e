import json
from pathlib import Path

from benchmarks.__main__ import _bars, latest


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_latest_lists_every_benchmark_with_the_date_and_command_its_result_records(tmp_path):
    scale = {"date": "2026-12-06 03:00:00", "command": "python -m benchmarks.scale"}
    write(tmp_path / "scale.json", {"context": scale})
    follow = {"date": "2026-12-03 17:56:57", "command": "python -m benchmarks.follow"}
    write(tmp_path / "follow" / "follow.json", follow)
    write(tmp_path / "quality" / "quality.json", {"all": {}})
    rows = {r["name"]: r for r in latest(tmp_path)}
    assert rows["scale"] == {"name": "scale", "result": "scale.md", **scale}
    assert rows["follow"]["result"] == "follow/follow.md" and rows["follow"]["date"] == "2026-12-03 17:56:57"
    assert rows["quality"]["date"] == "not recorded"
    assert rows["throughput"]["result"] == ""


def test_quality_and_control_bars_read_their_results(tmp_path):
    write(tmp_path / "quality" / "quality.json",
          {"checkpoint": {"path": "vllm_t2l/checkpoints/x"}, "all": {"generated adapter": {"gap_closed": 0.49}}})
    write(tmp_path / "control" / "control.json",
          {"summary": {"length/weight": {"bar_met": True}, "length/emb": {"bar_met": False},
                       "pirate/weight": {"bar_met": True}}})
    bars = {b[0].split(":")[0]: b for b in _bars(tmp_path)}
    assert bars["adapter quality (x)"][1:3] == ("49.0%", "NOT met")
    assert bars["control"][1:3] == ("2 of 2 pairs", "met")


def test_a_follow_shift_ratio_without_a_system_prompt_shift_reads_undefined(tmp_path):
    bars = {"moved": 0.73, "moved_met": False, "shift_ratio": float("nan"), "shift_met": False, "ppl_ratio": 1.29,
            "ppl_met": True}
    write(tmp_path / "follow" / "follow.json", {"recommended": 2.0, "bars": bars})
    rows = {b[0]: b for b in _bars(tmp_path)}
    shift = rows["follow, strength 2: median shift >= 1.5x the system prompt's"]
    assert shift[1:3] == ("undefined (the system prompt's median shift is not above 0)", "NOT met")
    assert rows["follow, strength 2: median perplexity <= 1.5x the system prompt's"][1:3] == ("1.29x", "met")
