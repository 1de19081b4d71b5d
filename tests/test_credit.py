"""`qstar inspect --credit`: the per-token implicit reward map of a trained iteration."""

import json

import pytest
from tiny import build_tiny_model

from pipeline.cli import main
from pipeline.run.atomic import write_json
from pipeline.run.store import RunStore


def _trained(path, reference, **meta):
    """A tiny model as a policy one DPO phase trained against `reference` (its meta.json)."""
    trained = build_tiny_model(path, seed=1)  # a different policy than the base
    write_json(trained / "meta.json", {"config": {"beta": 0.1}, "metrics": {"phases": ["dpo"]},
                                       "source_policy": reference, "reference": reference, **meta})
    return trained


PROMPT = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


def _run(root, base, trained) -> RunStore:
    """A run whose iteration 0 trained `trained` and searched one problem."""
    store = RunStore(root)
    store.set_info(config={"model": {"name": str(base), "dtype": "float32", "device": "cpu",
                                     "cache_dir": str(root.parent / "cache")},
                           "train": {"beta": 0.1}})
    store.complete(0, "train", {"policy_dir": str(trained)}, 1.0)
    row = {"problem_id": "p/1", "question": "What is 2+3?", "prompt": PROMPT,
           "tree": {"best_text": "2 + 3 = 5\nAnswer: 5", "nodes": []}}
    search = store.stage_dir(0, "search")
    search.mkdir(parents=True)
    (search / "shard_0000.jsonl").write_text(json.dumps(row) + "\n")
    return store


def test_credit_map_compares_the_trained_policy_with_its_reference(tiny_model_dir, tmp_path, capsys):
    trained = _trained(tmp_path / "policy_1", str(tiny_model_dir))
    store = _run(tmp_path / "run", tiny_model_dir, trained)
    prompt = PROMPT
    assert main(["inspect", str(store.root), "--iter", "0", "--problem", "p/1", "--credit"]) == 0
    page = (store.root / "inspect" / "credit_iter0_p_1.html").read_text()
    assert page.count("<span title=") == len("2 + 3 = 5\nAnswer: 5")  # one span per character token
    assert "rgba(0, 160, 0" in page and "rgba(220, 0, 0" in page  # credited and blamed tokens
    assert _total(page) == pytest.approx(_by_hand(trained, tiny_model_dir, prompt), abs=2e-4)


def test_credit_map_reads_the_dpo_phase_and_the_recorded_reference(tiny_model_dir, tmp_path):
    """After SFT the log-ratio is the kept DPO phase's; the reference is the one meta.json records
    (here another model than policy_N, as train.reference=base records policy_0)."""
    reference = build_tiny_model(tmp_path / "policy_0", seed=4)
    trained = _trained(tmp_path / "policy_1", str(reference), implicit_policy="dpo_phase")
    build_tiny_model(trained / "dpo_phase", seed=2)
    store = _run(tmp_path / "run", tiny_model_dir, trained)
    prompt = PROMPT
    assert main(["inspect", str(store.root), "--iter", "0", "--problem", "p/1", "--credit"]) == 0
    total = _total((store.root / "inspect" / "credit_iter0_p_1.html").read_text())
    assert total == pytest.approx(_by_hand(trained / "dpo_phase", reference, prompt), abs=2e-4)
    assert total != pytest.approx(_by_hand(trained, tiny_model_dir, prompt), abs=2e-4)


def _total(page: str) -> float:
    return float(page.split("total ")[1].split("<")[0])


def _by_hand(policy, reference, prompt: str) -> float:
    from pipeline.config import ModelConfig
    from pipeline.lm.models import load_model
    from pipeline.lm.teacher_forced import completion_logprobs

    pol, tokenizer = load_model(ModelConfig(name=str(policy)))
    ref, _ = load_model(ModelConfig(name=str(reference)))
    text = "2 + 3 = 5\nAnswer: 5"
    return 0.1 * (sum(completion_logprobs(pol, tokenizer, [prompt], [text])[0]) -
                  sum(completion_logprobs(ref, tokenizer, [prompt], [text])[0]))


def test_credit_map_needs_a_trained_iteration(tiny_model_dir, tmp_path, capsys):
    store = RunStore(tmp_path / "run")
    store.set_info(config={"model": {"name": str(tiny_model_dir)}, "train": {"beta": 0.1}})
    store.complete(0, "train", {"skipped": "no pairs", "policy_dir": str(tiny_model_dir)}, 0.0)
    search = store.stage_dir(0, "search")
    search.mkdir(parents=True)
    (search / "shard_0000.jsonl").write_text(json.dumps(
        {"problem_id": "p/1", "question": "q", "prompt": "p", "tree": {"best_text": "x"}}) + "\n")
    assert main(["inspect", str(store.root), "--iter", "0", "--problem", "p/1", "--credit"]) == 2
    assert "no trained policy" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_artifacts_follow_the_umask(tmp_path, umask):
    import os

    from pipeline.run.atomic import write_json

    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
