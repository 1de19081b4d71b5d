"""benchmarks/loop_seeds.py: arm (c) over seeds, on hand-made matched_budget.py outputs whose
grades sit where matched_budget.py caches them; every number below is computed by hand."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loop_seeds  # noqa: E402

PROBLEMS = [f"q{i}" for i in range(4)]


def write_grades(path: Path, right: set[str]) -> None:
    rows = [{"id": pid, "correct": pid in right} for pid in PROBLEMS]
    path.write_text(json.dumps({"rows": rows, "accuracy": len(right) / len(PROBLEMS)}))


def proof(tmp_path: Path, name: str, mcts: list[float], star: list[float],
          grades: dict[int, tuple[set, set]] | None) -> Path:
    """A matched_budget.py output for one seed; grades[k] = (MCTS's right ids, STaR's) at policy k."""
    runs = tmp_path / name
    (runs / "test_evals").mkdir(parents=True)
    for k, (m, s) in (grades or {}).items():
        write_grades(runs / "test_evals" / f"p{k}_greedy.json", m)
        write_grades(runs / "test_evals" / f"star_p{k}_greedy.json", s)
    out = tmp_path / f"{name}.json"
    out.write_text(json.dumps({
        "split": "test", "runs": {"mcts": str(runs / "mcts"), "star": str(runs / "star")},
        "star_calibration": {"samples_used": 10},
        "loop": {"mcts": {"test_greedy": mcts}, "star": {"test_greedy": star}}}))
    return out


def test_per_seed_mean_and_pooled_pairs(tmp_path):
    one = proof(tmp_path, "s1", [0.25, 0.5, 0.75, 0.5], [0.25, 0.25, 0.75, 0.75],
                {1: ({"q0", "q1"}, {"q0"}), 2: ({"q0", "q1", "q2"}, {"q0", "q1", "q3"}),
                 3: ({"q0", "q1"}, {"q0", "q1", "q2"})})
    two = proof(tmp_path, "s2", [0.25, 0.75, 0.5, 0.75], [0.25, 0.5, 0.5, 0.25],
                {1: ({"q0", "q1", "q2"}, {"q1", "q2"}), 2: ({"q0", "q3"}, {"q0", "q3"}),
                 3: ({"q0", "q1", "q2"}, {"q3"})})
    old = proof(tmp_path, "s0", [0.0, 0.25, 0.5, 0.75], [0.0, 0.5, 0.5, 0.5], None)  # no grades
    out = tmp_path / "seeds.json"
    got = loop_seeds.main(["--seed", f"1={one}", "--seed", f"2={two}", "--seed", f"0={old}",
                           "--output", str(out)])
    assert json.loads(out.read_text()) == got
    assert got["per_seed"]["1"]["mcts_minus_star"] == [0.25, 0.0, -0.25]
    assert got["per_seed"]["1"]["iterations_mcts_at_least_star"] == 2
    assert got["per_seed"]["1"]["mcts_stops_rising_at_policy"] == 3
    assert got["per_seed"]["2"]["mcts_stops_rising_at_policy"] == 2
    assert got["per_seed"]["0"]["mcts_stops_rising_at_policy"] is None  # rises throughout
    # means over the three seeds: MCTS (0.5 + 0.75 + 0.25) / 3 at policy 1, STaR 1.25 / 3
    assert got["mean"]["mcts_test_greedy"] == [round(0.5 / 3, 4), 0.5, 0.5833, 0.6667]
    assert got["mean"]["star_test_greedy"] == [round(0.5 / 3, 4), 0.4167, 0.5833, 0.5]
    assert got["mean"]["mcts_minus_star"] == [0.0833, 0.0, 0.1667]
    assert got["mean"]["iterations_mcts_at_least_star"] == 3
    assert got["mean"]["mcts_stops_rising_at_policy"] is None  # 0.17, 0.5, 0.58, 0.67
    assert got["paired_seeds"] == ["1", "2"] and got["seeds_without_grades"] == ["0"]
    # policy 3 over 8 (seed, problem) pairs. Seed 1: MCTS {q0, q1} against STaR {q0, q1, q2}:
    # STaR alone on 1/q2. Seed 2: {q0, q1, q2} against {q3}: MCTS alone on three, STaR on 2/q3
    third = got["pooled_paired"][2]
    assert third["policy"] == 3 and third["seeds"] == ["1", "2"]
    assert third["paired"]["problems"] == 8
    assert (third["paired"]["mcts_only"], third["paired"]["star_only"]) == (3, 2)
    assert third["paired"]["difference"] == 0.125
    first = got["pooled_paired"][0]["paired"]
    assert (first["mcts_only"], first["star_only"]) == (2, 0)  # s1/q1 and s2/q0


def test_refusals_name_the_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        loop_seeds.main(["--seed", str(tmp_path / "x.json")])
    assert exc.value.code == 2 and "expected SEED=JSON" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"split": "test", "loop": {"mcts": {"test_greedy": [0.1]}}}))
    with pytest.raises(SystemExit) as exc:
        loop_seeds.main(["--seed", f"1={bad}"])
    assert exc.value.code == 2 and f"--seed 1={bad}: not a matched_budget.py output" in \
        capsys.readouterr().err
    dev = proof(tmp_path, "dev", [0.1, 0.2], [0.1, 0.1], None)
    dev.write_text(dev.read_text().replace('"test"', '"dev"'))
    test = proof(tmp_path, "t", [0.1, 0.2], [0.1, 0.1], None)
    with pytest.raises(SystemExit) as exc:
        loop_seeds.main(["--seed", f"1={dev}", "--seed", f"2={test}"])
    assert exc.value.code == 2 and "different splits" in capsys.readouterr().err


def test_held_out_sets_pool_with_the_seeds_own_problems(tmp_path, monkeypatch):
    """--held-out grades every policy on another set (here a stand-in grader writes the files
    matched_budget.loop_arm would cache) and every curve and pair is over both sets' problems."""
    new = ["n0", "n1"]
    right = {0: ({"n0"}, {"n0"}), 1: ({"n0", "n1"}, set()), 2: (set(), {"n1"})}
    calls = []

    def fake_loop_arm(base, stores, iterations, out):
        calls.append((base, sorted(stores), iterations, out))
        for k, (m, s) in right.items():
            for name, ids in (("p", m),) + ((("star_p", s),) if k else ()):
                rows = [{"id": pid, "correct": pid in ids} for pid in new]
                (out / f"{name}{k}_greedy.json").write_text(json.dumps({"rows": rows}))

    monkeypatch.setattr(loop_seeds, "loop_arm", fake_loop_arm)
    one = proof(tmp_path, "s1", [0.25, 0.5, 0.75], [0.25, 0.25, 0.5],
                {0: ({"q0"}, {"q0"}), 1: ({"q0", "q1"}, {"q0"}), 2: ({"q0", "q1", "q2"}, {"q0", "q1"})})
    got = loop_seeds.main(["--seed", f"1={one}", "--output", str(tmp_path / "o.json"),
                           "--held-out", "task.seed=1", "task.num_test=2"])
    folder = tmp_path / "s1" / "test_evals_task.num_test-2_task.seed-1"
    assert calls == [(["task.seed=1", "task.num_test=2"], ["mcts", "star"], 2, folder)]
    assert got["held_out"] == [["task.seed=1", "task.num_test=2"]]
    assert got["problems_per_seed"] == {"1": 6}
    # six problems: policy 0 {q0, n0} = 2/6; policy 1 MCTS {q0, q1, n0, n1} 4/6, STaR {q0} 1/6;
    # policy 2 MCTS {q0, q1, q2} 3/6, STaR {q0, q1, n1} 3/6
    row = got["per_seed"]["1"]
    assert row["mcts_test_greedy"] == [0.3333, 0.6667, 0.5]
    assert row["star_test_greedy"] == [0.3333, 0.1667, 0.5]
    assert row["mcts_minus_star"] == [0.5, 0.0] and row["mcts_stops_rising_at_policy"] == 2
    first = got["pooled_paired"][0]
    assert first["policy"] == 1 and first["paired"]["problems"] == 6
    assert (first["paired"]["mcts_only"], first["paired"]["star_only"]) == (3, 0)
    again = loop_seeds.main(["--seed", f"1={one}", "--output", str(tmp_path / "o.json"),
                             "--held-out", "task.seed=1", "task.num_test=2"])
    assert again["per_seed"] == got["per_seed"]  # the cached grades, read back


def test_held_out_refusals(tmp_path, capsys):
    one = proof(tmp_path, "s1", [0.25, 0.5], [0.25, 0.25], None)  # its own grades are gone
    with pytest.raises(SystemExit) as exc:
        loop_seeds.main(["--seed", f"1={one}", "--held-out", "search.seed=1"])
    assert exc.value.code == 2 and "--held-out search.seed=1: expected task overrides" in \
        capsys.readouterr().err
    for bad, said in (("task.nope=1", "Key 'nope' not in 'TaskConfig'"),
                      ("task.num_test=abc", "could not be converted to Integer")):
        with pytest.raises(SystemExit) as exc:
            loop_seeds.main(["--seed", f"1={one}", "--held-out", bad])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and f"--held-out {bad}: " in err and said in err
        assert "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        loop_seeds.main(["--seed", f"1={one}", "--held-out", "task.seed=1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--seed 1: its own test grades" in err
    no_base = proof(tmp_path, "s2", [0.25, 0.5], [0.25, 0.25], {1: ({"q0"}, set())})  # no p0
    with pytest.raises(SystemExit) as exc:
        loop_seeds.main(["--seed", f"2={no_base}", "--held-out", "task.seed=1"])
    assert exc.value.code == 2 and "the base's too) are not beside its runs" in capsys.readouterr().err


def test_a_held_out_set_that_repeats_a_problem_is_refused(tmp_path, monkeypatch, capsys):
    def fake_loop_arm(base, stores, iterations, out):  # grades the seed's own q0 again
        for name in ("p0", "p1", "star_p1"):
            (out / f"{name}_greedy.json").write_text(json.dumps({"rows": [{"id": "q0", "correct": 1}]}))

    monkeypatch.setattr(loop_seeds, "loop_arm", fake_loop_arm)
    one = proof(tmp_path, "s1", [0.25, 0.5], [0.25, 0.25], {0: ({"q0"}, {"q0"}), 1: ({"q0"}, set())})
    with pytest.raises(SystemExit) as exc:
        loop_seeds.main(["--seed", f"1={one}", "--held-out", "task.num_test=1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "shares 1 problems with the sets before it (e.g. q0)" in err
