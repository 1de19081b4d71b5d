"""benchmarks/learned_selector.py: the per-sample features against values worked out by hand,
the fit against a signal it must find, and the whole script on a graded JSON written here."""

import json
import math
import statistics

import pytest
from conftest import load_benchmark

from pipeline.compose import compose_config
from pipeline.config import to_dict
from pipeline.tasks import make_task


@pytest.fixture(scope="module")
def sel():
    return load_benchmark("learned_selector")


def extract(text):
    return text.rsplit("Answer: ", 1)[-1] if "Answer: " in text else None


def test_features_by_hand(sel):
    candidates = ["2 + 2 = 5\nAnswer: 5",  # false equality, answer supported
                  "2 + 2 = 4\nAnswer: 4",  # passes both
                  "2 + 2 = 4\nAnswer: 4",
                  "2 + 2 = 4\nAnswer: 9",  # answer not its working's last number
                  "no answer"]
    rows = sel.sample_features(candidates, extract, orm=[0.1, 0.2, 0.3, 0.4, 0.5],
                               implicit=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert [r["vote_share"] for r in rows] == pytest.approx([1 / 5, 2 / 5, 2 / 5, 1 / 5, 0.0])
    assert [r["step_check"] for r in rows] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert [r["answer_check"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 1.0]
    # both checks pass 3 samples; "no answer" answers nothing, so "4" holds all that answer
    assert [r["checked_share"] for r in rows] == pytest.approx([0.0, 1.0, 1.0, 0.0, 0.0])
    assert [r["lines"] for r in rows] == [2.0, 2.0, 2.0, 2.0, 1.0]
    assert [r["orm"] for r in rows] == [0.1, 0.2, 0.3, 0.4, 0.5]
    z = [r["implicit"] for r in rows]
    assert statistics.fmean(z) == pytest.approx(0.0) and statistics.pstdev(z) == pytest.approx(1.0)
    bare = sel.sample_features(candidates, extract, orm=None, implicit=None)
    assert "orm" not in bare[0] and "implicit" not in bare[0]


def test_fit_finds_the_signal_and_ignores_noise(sel):
    """Labels follow `a` alone; `b` is independent of them. Standardised, `a` is +-1 and the
    bias 0, so the penalised optimum solves 1 - sigmoid(w) = 2 * L2 * w (the loss's gradient);
    `b`'s weight is zero, and the probabilities rank the labels perfectly."""
    features, right = [], []
    for k in range(200):
        a = float(k % 2)
        features.append({"a": a, "b": float((k // 2) % 2)})
        right.append(a)
    model = sel.fit(features, right, ["a", "b"])
    weights = model.summary()["weights"]
    w = weights["a"]
    assert 1 - 1 / (1 + math.exp(-w)) == pytest.approx(2 * sel.L2 * w, abs=1e-3)
    assert w > 2 and abs(weights["b"]) < 1e-3
    p = model.probability(features)
    assert min(x for x, y in zip(p, right) if y) > max(x for x, y in zip(p, right) if not y)


def test_vote_reading_sums_over_the_answer(sel):
    samples = sel.Samples(features=[], right=[1, 1, 0, 0], problem=["x"] * 4,
                          rows=[{"id": "x", "candidates": ["a", "b", "c", "d"],
                                 "answers": ["4", "4", "5", None], "right": [1, 1, 0, 0]}])
    found = sel.reading_scores(samples, [0.2, 0.3, 0.9, 0.8])
    assert found["sample"] == [0.2, 0.3, 0.9, 0.8]
    assert found["vote"] == pytest.approx([0.5, 0.5, 0.9, 0.0])


def _graded(tmp_path, split, rows, cfg, name=None):
    path = tmp_path / f"{name or split}.json"
    path.write_text(json.dumps({"config": to_dict(cfg) | {"eval": {"split": split}}, "rows": rows}))
    return path


def _rows(problems, right_first):
    """Per problem, 6 samples: 2 right that pass both checks; 3 wrong, the majority, that state
    a false equality; 1 wrong whose answer is not its working's last number."""
    rows = []
    for p in problems:
        a, b, c = p.answer, str(int(p.answer) + 1), str(int(p.answer) + 2)
        right = [f"{a} + 0 = {a}\nAnswer: {a}"] * 2
        wrong = [f"{b} + 1 = {b}\nAnswer: {b}"] * 3 + [f"{a} + 0 = {a}\nAnswer: {c}"]
        rows.append({"id": p.id, "candidates": right + wrong if right_first else wrong + right})
    return rows


def test_the_script_end_to_end(sel, tmp_path, capsys):
    """Fit on training problems where the checks say who is right and the vote says otherwise;
    on held-out problems alike (their samples in another order), the fitted selector ranks
    every problem right (AUC 1) and picks right, where majority picks wrong everywhere. The
    first training problem is excluded with --exclude-train 1."""
    cfg = compose_config(["task.num_train=12"])
    task = make_task(cfg.task)
    train, dev = task.split("train"), task.split("dev")[:6]
    fit_json = _graded(tmp_path, "train", _rows(train, right_first=False), cfg)
    dev_json = _graded(tmp_path, "dev", _rows(dev, right_first=True), cfg)
    out = tmp_path / "out.json"
    assert sel.main(["--fit", f"1={fit_json}", "--held-out", f"1={dev_json}",
                     "--exclude-train", "1", "--output", str(out)]) == 0
    found = json.loads(out.read_text())["policies"]["1"]
    assert found["fit_problems"] == 11 and found["fit_samples"] == 66
    assert found["held_out_problems"] == found["held_out_problems_with_both"] == 6
    assert found["features"] == ["vote_share", "step_check", "answer_check", "checked_share", "lines"]
    assert found["within_problem_auc"]["sample"] == pytest.approx(1.0)
    assert found["within_problem_auc"]["checked_majority_score"] == pytest.approx(1.0)
    assert found["accuracy"] == {"majority": 0.0, "checked_majority": 1.0, "sample": 1.0, "vote": 1.0}
    assert found["weights"]["checked_share"] > 0

    def refused(args):
        code = sel.main([*args, "--output", str(tmp_path / "refused.json")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and not (tmp_path / "refused.json").exists()
        return err

    assert f"{dev_json} is graded on dev problems" in refused(  # a fit must read training problems
        ["--fit", f"1={dev_json}", "--held-out", f"1={dev_json}"])
    assert f"{fit_json} is graded on train problems" in refused(
        ["--fit", f"1={fit_json}", "--held-out", f"1={fit_json}"])
    assert "--fit names policies ['1'], --held-out ['2']" in refused(
        ["--fit", f"1={fit_json}", "--held-out", f"2={dev_json}"])
    assert "expected POLICY=GRADED_JSON" in refused(["--fit", "1", "--held-out", f"1={dev_json}"])
    greedy = _graded(tmp_path, "dev", [{"id": p.id, "completion": "Answer: 1"} for p in dev], cfg,
                     name="greedy")
    assert "records no candidates: grade it with decode=best_of_n" in refused(
        ["--fit", f"1={fit_json}", "--held-out", f"1={greedy}"])
    # the per-text fit reads no agreement; here the two checks alone separate right from wrong
    per_text = found["per_text"]
    assert per_text["features"] == ["step_check", "answer_check", "lines"]
    assert per_text["within_problem_auc"]["sample"] == pytest.approx(1.0)
