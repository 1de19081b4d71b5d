"""The `qstar` command: bad input is one `error:` line and exit code 2; `qstar eval` prints a
table and writes JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.compose import compose_config
from pipeline.tasks import make_task

QSTAR = Path(sys.executable).parent / "qstar"



def gsm_rows(n: int) -> list[str]:
    return [json.dumps({"question": f"What is {i} plus one?",
                        "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) for i in range(n)]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_one_error_line(capsys, rc, *needles):
    out = capsys.readouterr()
    assert rc == 2
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1, out.err
    assert lines[0].startswith("error:")
    assert "Traceback" not in out.err + out.out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------- bad input, in-process


def test_unknown_model_path(capsys, debug_overrides, tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    rc = main(["eval", *debug_overrides, f"model={missing}", f"eval.output={tmp_path / 'e.json'}"])
    assert_one_error_line(capsys, rc, str(missing))
    assert not (tmp_path / "e.json").exists()


def test_unknown_hub_id_offline(capsys, debug_overrides, tmp_path):
    rc = main(["eval", *debug_overrides, "model=nobody-qstar/no-such-model"])
    assert_one_error_line(capsys, rc, "nobody-qstar/no-such-model")


def test_unknown_reasoning_gym_name_lists_valid_names(capsys, debug_overrides):
    rc = main(["eval", *debug_overrides, "task=reasoning_gym", "task.name=no_such_generator"])
    line = assert_one_error_line(capsys, rc, "no_such_generator")
    assert "chain_sum" in line and "basic_arithmetic" in line


def test_malformed_jsonl_row_names_file_and_line(capsys, debug_overrides, tmp_path):
    rows = gsm_rows(12)
    rows[4] = '{"question": "broken row", "answer": '  # line 5: not JSON
    data = write_lines(tmp_path / "data.jsonl", rows)
    rc = main(["eval", *debug_overrides, "task=jsonl", f"task.path={data}"])
    line = assert_one_error_line(capsys, rc, f"{data}:5")
    assert "skip_bad_rows" in line


def test_skip_bad_rows_makes_it_work(capsys, debug_overrides, tmp_path):
    rows = gsm_rows(14)
    rows[4] = '{"question": "broken row", "answer": '
    rows[7] = json.dumps({"question": "no final answer", "answer": "just words"})
    data = write_lines(tmp_path / "data.jsonl", rows)
    output = tmp_path / "eval.json"
    rc = main(["eval", *debug_overrides, "task=jsonl", f"task.path={data}",
               "task.skip_bad_rows=true", f"eval.output={output}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "skipped 2 bad rows" in out.err
    result = json.loads(output.read_text())
    assert result["summary"]["total"] == 4
    assert all("broken" not in r["completion"] for r in result["rows"])


def test_three_splits_larger_than_data(capsys, debug_overrides, tmp_path):
    data = write_lines(tmp_path / "data.jsonl", gsm_rows(10))
    rc = main(["eval", *debug_overrides, "task=jsonl", f"task.path={data}",
               "task.num_test=50"])
    assert_one_error_line(capsys, rc, "task.num_train=4 + task.num_dev=4 + task.num_test=50 = 58",
                          "10")


@pytest.mark.parametrize("override,key", [("search.simulations=0", "search.simulations"),
                                          ("search.c_puct=abc", "c_puct"),
                                          ("decode=nope", "greedy"),
                                          ("nonsense_key=1", "nonsense_key")])
def test_invalid_config_value(capsys, debug_overrides, override, key):
    rc = main(["eval", *debug_overrides, override])
    assert_one_error_line(capsys, rc, key)


def test_unknown_command(capsys):
    rc = main(["frobnicate", "x=1"])
    assert_one_error_line(capsys, rc, "frobnicate", "eval")


def test_usage(capsys):
    assert main([]) == 2
    assert "qstar eval" in capsys.readouterr().out
    assert main(["--help"]) == 0
    assert "qstar run" in capsys.readouterr().out


def test_negative_alpha_with_mcts_is_one_error_line(capsys, debug_overrides, tmp_path):
    rc = main(["eval", *debug_overrides, "decode=mcts", "search.alpha=-1",
               f"eval.output={tmp_path / 'e.json'}"])
    assert_one_error_line(capsys, rc, "search.alpha")


def test_invalid_hub_id_is_one_error_line(capsys, debug_overrides):
    rc = main(["eval", *debug_overrides, "model=HuggingFaceTB/SmolLM2--135M"])
    assert_one_error_line(capsys, rc, "SmolLM2--135M")


def test_eval_reads_dev_by_default_and_test_only_when_named(capsys, debug_overrides, tmp_path):
    data = write_lines(tmp_path / "data.jsonl", gsm_rows(12))
    task_args = ["task=jsonl", f"task.path={data}"]
    task = make_task(compose_config([*debug_overrides, *task_args]).task)
    seen = {}
    for split, extra in (("dev", []), ("test", ["eval.split=test"])):
        output = tmp_path / f"{split}.json"
        rc = main(["eval", *debug_overrides, *task_args, *extra, f"eval.output={output}"])
        assert rc == 0, capsys.readouterr().err
        result = json.loads(output.read_text())
        assert result["summary"]["split"] == split
        seen[split] = [r["id"] for r in result["rows"]]
        assert seen[split] == [p.id for p in task.split(split)]
    assert not set(seen["dev"]) & set(seen["test"])
    capsys.readouterr()
    rc = main(["eval", *debug_overrides, *task_args, "eval.split=heldout"])
    assert_one_error_line(capsys, rc, "eval.split", "train, dev, test")


# ---------------------------------------------------------------- the installed script


def test_console_script_exit_code_and_single_error_line(tmp_path, tiny_model_dir):
    missing = tmp_path / "missing-model"
    data = write_lines(tmp_path / "data.jsonl", gsm_rows(3))  # skips importing reasoning-gym
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([str(QSTAR), "eval", "debug=default", f"model={missing}",
                           f"model.cache_dir={tmp_path / 'cache'}", "task=jsonl",
                           f"task.path={data}", "task.num_train=1", "task.num_dev=1",
                           "task.num_test=1"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(missing) in lines[0], \
        proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


# ---------------------------------------------------------------- qstar eval on the tiny model


@pytest.mark.parametrize("extra,strategy", [([], "greedy"),
                                            (["decode=greedy"], "greedy"),
                                            (["decode=best_of_n", "decode.n=2"], "best_of_n")])
def test_eval_prints_table_and_writes_json(capsys, debug_overrides, tmp_path, extra, strategy):
    output = tmp_path / "out" / "eval.json"
    rc = main(["eval", *debug_overrides, *extra, f"eval.output={output}"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Traceback" not in out.err
    table = out.out.splitlines()
    header = next(i for i, line in enumerate(table) if line.split()[:2] == ["strategy", "accuracy"])
    row = table[header + 2].split()
    assert row[0] == strategy
    result = json.loads(output.read_text())
    summary = result["summary"]
    assert {"accuracy", "tokens", "seconds", "tokens_per_s"} <= set(summary)
    assert summary["strategy"] == strategy and summary["total"] == 4 == len(result["rows"])
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert summary["accuracy"] == pytest.approx(summary["correct"] / summary["total"])
    assert float(row[1]) == pytest.approx(summary["accuracy"], abs=1e-3)
    assert summary["tokens"] > 0 and summary["seconds"] >= 0
    if summary["seconds"] > 0.05:
        assert summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["seconds"],
                                                        rel=0.2)
    # best_of_n samples n completions per problem; greedy one
    per_problem_cap = 16 * (2 if strategy == "best_of_n" else 1)  # debug: max_new_tokens=16
    assert summary["tokens"] <= 4 * per_problem_cap
    assert result["config"]["decode"]["strategy"] == strategy
    assert str(output) in out.out


def test_eval_with_a_missing_critics_dir_is_one_error_line(debug_overrides, tmp_path, capsys):
    code = main(["eval", *debug_overrides, "decode=best_of_n", "decode.select=orm",
                 f"eval.critics={tmp_path / 'nope'}", f"eval.output={tmp_path / 'o.json'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "eval.critics=" in err[0]


def test_eval_orm_selection_without_critics_is_refused(debug_overrides, tmp_path, capsys):
    code = main(["eval", *debug_overrides, "decode=best_of_n", "decode.select=orm",
                 f"eval.output={tmp_path / 'o.json'}"])
    assert code == 2 and "eval.critics=" in capsys.readouterr().err


def test_sweep_variants_cover_every_value_once():
    from pipeline.cli import sweep_variants

    assert sweep_variants(["a=1,2", "b=x", "c=[1,2]", "d=3,4"]) == [
        ["a=1", "b=x", "c=[1,2]", "d=3"], ["a=2", "b=x", "c=[1,2]", "d=3"],
        ["a=1", "b=x", "c=[1,2]", "d=4"]]


def test_sweep_variants_read_hydras_sweep_syntax():
    from pipeline.cli import sweep_variants

    # range/choice/tag expand to their values, an optuna interval to its two ends, a quoted
    # comma is one value, and a glob over a group's options is left to Hydra
    assert sweep_variants(["a=range(1,4)", "b=choice(x,y)", "c=interval(0.5,2.0)",
                           "d='p,q'", "e=tag(t,choice(5,6))", "f=glob(*)"]) == [
        ["a=1", "b=x", "c=0.5", "d='p,q'", "e=5"], ["a=2", "b=x", "c=0.5", "d='p,q'", "e=5"],
        ["a=3", "b=x", "c=0.5", "d='p,q'", "e=5"], ["a=1", "b=y", "c=0.5", "d='p,q'", "e=5"],
        ["a=1", "b=x", "c=2.0", "d='p,q'", "e=5"], ["a=1", "b=x", "c=0.5", "d='p,q'", "e=6"]]


@pytest.mark.parametrize("command", [["eval"], ["run", "-m"]])
def test_an_unparsable_override_is_one_line_naming_it(command, capsys):
    code = main([*command, "search.c_puct=range(1,"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "'search.c_puct=range(1,'" in err[0] and not err[0].endswith("None")


def test_a_bad_value_in_a_sweep_is_one_error_line_and_no_run_dir(debug_overrides, tmp_path,
                                                                  capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "-m", *debug_overrides, "search.c_puct=1.0,-2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "search.c_puct" in err[0]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sweep", ["search.c_puct=range(-2,2)", "search.c_puct=choice(1.0,-2)",
                                   "search.c_puct=interval(-2.0,1.0)"])
def test_a_bad_value_in_a_hydra_sweep_expression_is_refused_by_its_key(
        debug_overrides, tmp_path, capsys, monkeypatch, sweep):
    monkeypatch.chdir(tmp_path)
    code = main(["run", "-m", *debug_overrides, sweep])
    err = capsys.readouterr().err.strip().splitlines()
    # the bad value, not "Sweep parameters ... requires --multirun"
    assert code == 2 and len(err) == 1 and "search.c_puct" in err[0]
    assert "requires --multirun" not in err[0]
    assert not (tmp_path / "runs").exists()
