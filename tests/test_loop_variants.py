"""benchmarks/loop_variants.py on a tiny 2-iteration loop: the curve read off the run, variants
paired problem by problem against the default, dev only, and the output's other keys kept."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from test_train_history import restarted  # noqa: F401 fixture: a 2-iteration tiny run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loop_variants  # noqa: E402


def flip_first_row(run: Path, iteration: int) -> str:
    """Grade policy iteration+1's first dev problem the other way; its id."""
    path = run / f"iter_{iteration:03d}/eval/greedy.json"
    graded = json.loads(path.read_text())
    graded["rows"][0]["correct"] = not graded["rows"][0]["correct"]
    path.write_text(json.dumps(graded))
    return graded["rows"][0]["id"]


def test_curve_and_pairing_read_the_runs(restarted, tmp_path):  # noqa: F811
    run = restarted[0]
    variant = tmp_path / "variant"
    shutil.copytree(run, variant)
    flipped = flip_first_row(variant, 1)
    out = tmp_path / "variants.json"
    out.write_text(json.dumps({"variants": {"v": {"commit": "abc"}}}))
    result = loop_variants.main(["--default", str(run), "--variant", f"v=a.b=1={variant}",
                                 "--output", str(out)])
    assert json.loads(out.read_text()) == result
    assert set(result["variants"]) == {"v", "v=a.b=1"}
    entry = result["variants"]["v=a.b=1"]
    points = result["default_rerun"]["curve"]
    assert [p["policy"] for p in points] == [0, 1, 2]
    assert [p.get("data_iterations") for p in points] == [None, 1, 2]  # train.history=-1
    for i, point in enumerate(points[1:]):
        rows = json.loads((run / f"iter_{i:03d}/eval/greedy.json").read_text())["rows"]
        right = sorted(r["id"] for r in rows if r["correct"])
        assert point["dev_greedy"] == pytest.approx(len(right) / len(rows))
        assert result["default_rerun"]["dev_greedy_right_ids"][f"policy_{i + 1}"] == right
    pairs = entry["paired_dev_greedy_against_default_rerun"]
    assert (pairs["policy_1"]["variant_only"], pairs["policy_1"]["default_only"]) == (0, 0)
    was_right = flipped in result["default_rerun"]["dev_greedy_right_ids"]["policy_2"]
    assert (pairs["policy_2"]["variant_only"], pairs["policy_2"]["default_only"]) == (
        (0, 1) if was_right else (1, 0))
    assert result["variants"]["v"] == {"commit": "abc"}  # what the output held stays


def test_a_run_graded_on_test_is_refused(restarted, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "on_test"
    shutil.copytree(restarted[0], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["eval"]["split"] = "test"
    (run / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out.json"
    with pytest.raises(SystemExit) as stop:
        loop_variants.main(["--default", str(run), "--output", str(out)])
    assert stop.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: {run} graded eval.split=test; loop variants are read on dev")


def test_a_run_without_greedy_grades_is_one_line(restarted, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "no_greedy"
    shutil.copytree(restarted[0], run)
    (run / "iter_001/eval/greedy.json").unlink()
    with pytest.raises(SystemExit) as stop:
        loop_variants.main(["--default", str(run), "--output", str(tmp_path / "out.json")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: {run / 'iter_001/eval/greedy.json'}: no greedy grade (the loop's eval.decodes "
        "must hold greedy)")
