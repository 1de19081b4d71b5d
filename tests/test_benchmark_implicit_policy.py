"""benchmarks/implicit_policy.py on the tiny model: --keep trains a run's DPO phase again and
keeps exactly the model the train stage would have kept; the three log-ratios on a best-of-N
eval's samples and the DPO phase's read per line, checked by hand (line cuts with SmolLM2's
BPE too); bad input is one line."""

import json
import shutil

import pytest
import torch
from conftest import load_benchmark
from test_train_stage import dpo_rows, sft_rows, weights, write_rows
from tiny import tiny_tokenizer

from critics.implicit import completion_tokens
from pipeline.compose import compose_config
from pipeline.config import to_dict
from pipeline.lm.models import resolve_model_path
from pipeline.run.store import RunStore
from pipeline.stages.train import train_policy
from pipeline.tasks import make_task


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("implicit_policy")


def _run(root, overrides, training="train=dpo_then_sft"):
    """A one-iteration run whose train stage trained DPO then SFT (or `training`) on hand-made
    rows."""
    cfg = compose_config([*overrides, training, "train.epochs=2"])
    store = RunStore(root)
    store.set_info(iterations=1, config=to_dict(cfg))
    base = resolve_model_path(cfg.model)
    data = write_rows(store.stage_dir(0, "data"), dpo=dpo_rows(), sft=sft_rows())
    metrics = train_policy(base, data, cfg.train, store.stage_dir(0, "train"), model_cfg=cfg.model,
                           iteration=0, reference_dir=base)
    store.complete(0, "train", {**metrics, "policy_dir": "iter_000/train/policy"}, 1.0)
    return store, cfg


def _samples(cfg, path):
    """A best-of-3 eval JSON of dev problems: the right answer and two wrong ones."""
    task = make_task(cfg.task)
    rows = []
    for p in task.split("dev"):
        candidates = [f"Answer: {int(p.answer) + 1}", f"Answer: {p.answer}", "Answer: x"]
        rows.append({"id": p.id, "candidates": candidates, "correct": False,
                     "correct_by_select": {"majority": False}})
    path.write_text(json.dumps({"summary": {"split": "dev", "select": "majority"}, "rows": rows}))
    return path


def test_keep_restores_the_dpo_phase_and_scores_three_log_ratios(bench, debug_overrides, tmp_path,
                                                                 capsys):
    store, cfg = _run(tmp_path / "run", debug_overrides)
    policy = store.root / "iter_000" / "train" / "policy"
    shutil.copytree(policy / "dpo_phase", tmp_path / "kept_by_the_run")
    shutil.rmtree(policy / "dpo_phase")  # as a run trained before the train stage kept it
    meta = json.loads((policy / "meta.json").read_text())
    (policy / "meta.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                  if k != "implicit_policy"}))
    out = tmp_path / "out" / "implicit_policy.json"
    eval_json = _samples(cfg, tmp_path / "p1_best_of_3_dev.json")
    result = bench.main(["--run", str(store.root), "--iterations", "1", "--keep",
                         "--samples", f"1={eval_json}", "--output", str(out)])
    [kept] = result["kept"]
    assert kept["kept"] == str(policy / "dpo_phase") and kept["matched"]
    again, before = weights(policy / "dpo_phase"), weights(tmp_path / "kept_by_the_run")
    assert all(torch.allclose(again[k], before[k], atol=1e-5) for k in before)
    assert json.loads((policy / "meta.json").read_text())["implicit_policy"] == "dpo_phase"
    assert not (store.root / "iter_000" / "train" / "dpo_phase_again").exists()

    [row] = result["log_ratios"]
    assert json.loads(out.read_text())["log_ratios"] == [json.loads(json.dumps(row))]
    assert row["split"] == "dev" and row["samples"] == 3 * row["problems"] and row["majority"] == 0
    cache = out.parent / ".implicit_policy_logprobs"
    tokens = {name: json.loads((cache / f"p1_p1_best_of_3_dev_{name}_tokens.json").read_text())
              for name in ("reference", "dpo", "policy")}
    sums = {name: [sum(lp) for lp in found] for name, found in tokens.items()}
    beta = cfg.train.beta  # by hand from the cached summed log-probs
    by_hand = {"policy": [beta * (p - r) for p, r in zip(sums["policy"], sums["reference"])],
               "dpo_phase": [beta * (d - r) for d, r in zip(sums["dpo"], sums["reference"])],
               "sft_phase": [p - d for p, d in zip(sums["policy"], sums["dpo"])]}
    for name, score in by_hand.items():
        picks = [max(range(3), key=lambda j: (score[3 * k + j], -j)) == 1  # 1 is the right one
                 for k in range(row["problems"])]
        found = row["by_log_ratio"][name]
        assert found["argmax"] == pytest.approx(sum(picks) / row["problems"]), name
        assert found["argmax_vs_majority"]["difference"] == pytest.approx(found["argmax"])  # majority got none right
    assert sums["dpo"] != pytest.approx(sums["policy"], abs=1e-4)  # SFT moved the policy
    # the DPO phase's log-ratio per line: every sample here is one line ("Answer: ..."), so the
    # worst line and the last line are its sum, and without the Answer line nothing is left
    for name, value in (("min_line", by_hand["dpo_phase"]), ("last_line", by_hand["dpo_phase"]),
                        ("without_answer", [0.0] * len(by_hand["dpo_phase"]))):
        picks = [max(range(3), key=lambda j: (value[3 * k + j], -j)) == 1
                 for k in range(row["problems"])]
        assert row["by_log_ratio"][f"dpo_phase_{name}"]["argmax"] == pytest.approx(
            sum(picks) / row["problems"]), name
    assert set(row["by_log_ratio"]) == set(by_hand) | {f"dpo_phase_{name}"
                                                       for name in bench.LINE_AGGREGATES}
    for name in row["by_log_ratio"]:
        auc = row["by_log_ratio"][name]["within_problem_auc"]
        assert auc is None or 0 <= auc <= 1
    assert "policy 1 (dev" in capsys.readouterr().out

    # a second --keep finds it kept; a policy without a kept phase cannot be scored
    assert bench.main(["--run", str(store.root), "--iterations", "1", "--keep"])["kept"] == [
        {"iteration": 0, "kept": "already"}]


def test_bad_input_is_one_line(bench, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--run", str(tmp_path)])
    assert exc.value.code == 2 and "no manifest.json" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--run", str(tmp_path), "--samples", "0=missing.json"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--samples '0=missing.json': expected I=EVAL_JSON" in err
    with pytest.raises(SystemExit) as exc:  # a manifest without a config: one line, not a traceback
        bench.main(["--run", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "manifest.json" in err


def test_samples_that_are_not_best_of_n_are_one_line(bench, debug_overrides, tmp_path, capsys):
    store, _ = _run(tmp_path / "run", debug_overrides)
    greedy = tmp_path / "greedy.json"
    greedy.write_text(json.dumps({"summary": {"split": "dev"}, "rows": [{"id": "a", "correct": 1}]}))
    capsys.readouterr()  # the training's own output
    with pytest.raises(SystemExit) as exc:
        bench.main(["--run", str(store.root), "--samples", f"1={greedy}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert f"--samples {greedy}: not a best-of-N `qstar eval` JSON" in err


def test_samples_of_a_policy_dpo_trained_last_are_one_line(bench, debug_overrides, tmp_path,
                                                          capsys):
    """Nothing to split off: the message says why, not that a DPO phase should be kept."""
    store, cfg = _run(tmp_path / "run", debug_overrides, "train=dpo")
    samples = _samples(cfg, tmp_path / "samples.json")
    capsys.readouterr()  # the training's own output
    with pytest.raises(SystemExit) as exc:
        bench.main(["--run", str(store.root), "--samples", f"1={samples}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "was trained in phases ['dpo']: no SFT phase followed DPO" in err


WORKING = "3 + 4 = 7\n7 - 0 = 7\n\nAnswer: 7"


@pytest.mark.parametrize("bpe", [True, False])
def test_text_lines_cut_at_newline_tokens(bench, bpe, request):
    """With SmolLM2's BPE ("\n\n" one token) and the per-character test tokenizer: the lines'
    texts are the working's lines, each token's reward in the line its token ends or is in."""
    tok = request.getfixturevalue("smollm2_tokenizer") if bpe else tiny_tokenizer()
    tokens = completion_tokens(tok, WORKING)
    assert "".join(tokens) == WORKING
    rewards = [float(k) for k in range(len(tokens))]
    lines = bench.text_lines(tokens, rewards)
    assert [t.strip() for t, _ in lines] == ["3 + 4 = 7", "7 - 0 = 7", "Answer: 7"]
    for text, part in lines:  # each line's rewards are its own tokens' (reward k = token k)
        assert part == list(range(int(part[0]), int(part[-1]) + 1))
        assert "".join(tokens[int(k)] for k in part) == text
    # only a blank line is dropped: the second "\n" of the per-character tokenizer
    assert "".join(t for t, _ in lines) in (WORKING, WORKING.replace("\n\n", "\n"))
    scores = bench.line_scores([tokens], [rewards])
    sums = [sum(part) for _, part in lines]
    assert scores["min_line"] == [min(sums)] and scores["last_line"] == [sums[-1]]
    assert scores["without_answer"] == [sums[0] + sums[1]]
    assert scores["min_line_mean"] == [min(s / len(p) for s, (_, p) in zip(sums, lines))]
    assert scores["mean"] == [pytest.approx(sum(sums) / sum(len(p) for _, p in lines))]


def test_text_lines_refuse_misaligned_rewards(bench):
    with pytest.raises(ValueError, match="2 tokens but 1 rewards"):
        bench.text_lines(["a", "\n"], [0.0])
