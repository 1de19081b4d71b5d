import json

import numpy as np
import pytest
import torch
from tiny import build_tiny_model

from critics import KINDS, CriticSet, hidden_features, train_head
from critics.features import encode_left_padded
from mcts import SearchParams, search
from mcts.fake import FakeCritic, FakePolicy, FakeVerifier
from pipeline.atomic import write_jsonl
from pipeline.config import CriticsConfig, ModelConfig
from pipeline.critics_stage import load_critic_set, train_critics
from pipeline.search_stage import load_shards

TEXTS = ["Q: 1 + 1?\nA: 2\n", "a", "What is 12 + 30?\nStep 1: add the two numbers\nAnswer: 42\n",
         "<|im_start|>user\nhi<|im_end|>\n", "Step 2: carry the 3 to the next column\n"]


def test_batched_features_equal_one_by_one(tiny_model):
    model, tokenizer = tiny_model
    batched = hidden_features(model, tokenizer, TEXTS, batch_size=4, max_length=64)
    alone = torch.cat([hidden_features(model, tokenizer, [t], 1, 64) for t in TEXTS])
    assert batched.shape == (len(TEXTS), model.config.hidden_size)
    assert torch.allclose(batched, alone, atol=1e-5)


def test_a_base_model_gives_the_causal_lms_features(tiny_model, tiny_model_dir):
    from transformers import AutoModel

    model, tokenizer = tiny_model
    base = AutoModel.from_pretrained(tiny_model_dir).eval()
    assert torch.allclose(hidden_features(base, tokenizer, TEXTS, 4, 64),
                          hidden_features(model, tokenizer, TEXTS, 4, 64), atol=1e-6)


def test_long_texts_keep_their_tail(tiny_model):
    model, tokenizer = tiny_model
    long = "x" * 50 + "Answer: 42\n"  # one token per character
    cut = hidden_features(model, tokenizer, [long], 1, max_length=11)
    assert torch.allclose(cut, hidden_features(model, tokenizer, ["Answer: 42\n"], 1, 64), atol=1e-5)
    assert encode_left_padded(tokenizer, [long], 11)[0].shape == (1, 11)


def _critic_set(model, tokenizer, batch_size):
    features = hidden_features(model, tokenizer, TEXTS, 8, 64)
    targets = torch.linspace(0, 1, len(TEXTS))
    heads = {kind: train_head(features, targets, "bce", 1e-2, 20, 2, seed=i)[0]
             for i, kind in enumerate(KINDS)}
    return CriticSet(model, tokenizer, heads, max_length=64, batch_size=batch_size)


def test_batched_scores_equal_one_by_one(tiny_model):
    critics = _critic_set(*tiny_model, batch_size=3)
    batched = critics.score(TEXTS)
    assert set(batched) == set(KINDS)
    assert np.ptp(batched["orm"]) > 1e-3  # trained heads: the scores differ between texts
    for i, text in enumerate(TEXTS):
        alone = critics.score([text])
        for kind in KINDS:
            assert alone[kind][0] == pytest.approx(batched[kind][i], abs=1e-5)
    assert set(critics.score(TEXTS[:2], ("prm",))) == {"prm"}


def test_orm_scorer_scores_prompt_plus_completion(tiny_model):
    critics = _critic_set(*tiny_model, batch_size=4)
    got = critics.orm_scorer()(["Q: 1 + 1?\n", "a"], ["A: 2\n", ""])
    assert got == pytest.approx(critics.score(TEXTS[:2], ("orm",))["orm"].tolist(), abs=1e-6)


def test_heads_from_another_backbone_are_refused(tiny_model):
    model, tokenizer = tiny_model
    head, _ = train_head(torch.randn(4, 7), [0.0, 1.0, 0.0, 1.0], "bce", 1e-2, 1, 2, seed=0)
    with pytest.raises(ValueError, match="trained on another backbone"):
        CriticSet(model, tokenizer, {"orm": head}, max_length=64, batch_size=4)


def _shard_rows(num_problems=6, simulations=12):
    prompts = [f"<|im_start|>user\nWhat is {i} + {2 * i}?<|im_end|>\n<|im_start|>assistant\n"
               for i in range(num_problems)]
    trees = search(prompts, FakePolicy(), FakeCritic(), SearchParams(simulations=simulations, seed=1),
                   terminal_reward_fn=FakeVerifier())
    return [{"problem_id": f"p{i}", "iteration": 0, "prompt": t.prompt, "tree": t.to_json()}
            for i, t in enumerate(trees)]


CFG = CriticsConfig(learning_rate=1e-3, epochs=10, batch_size=16, max_length=128,
                    heldout_fraction=0.34, score_batch_size=16)


def test_train_critics_end_to_end(tiny_model_dir, tmp_path):
    rows = _shard_rows()
    for shard in range(2):
        write_jsonl(tmp_path / "search" / f"shard_{shard:03d}.jsonl", rows[shard::2])
    rows = load_shards(tmp_path / "search")
    out = tmp_path / "critics"
    metrics = train_critics(rows, str(tiny_model_dir), CFG, out)  # loads the backbone itself
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "orm", "prm", "value"]
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert len(metrics["heldout_problems"]) == 2 and metrics["texts"] > 0
    for kind in KINDS:
        assert sorted(p.name for p in (out / kind).iterdir()) == ["head.safetensors", "meta.json"]
        meta = json.loads((out / kind / "meta.json").read_text())
        assert meta["kind"] == kind and meta["backbone"] == str(tiny_model_dir)
        assert meta["hidden_size"] == 32 and meta["max_length"] == 128
        assert meta["examples"]["train"] > 0 and meta["examples"]["heldout"] > 0
        assert meta["config"]["epochs"] == 10 and meta["metrics"]["trained"]
        m = metrics[kind]
        assert m["train_loss_last"] < m["train_loss_first"]
        assert m["mse"] is not None and m["ece"] is not None
        assert all(m[name] is None for name in m["skipped"])
    assert metrics["orm"]["auc"] is not None and metrics["orm"]["accuracy"] is not None


def test_critic_set_loads_and_scores_what_train_critics_wrote(tiny_model, tiny_model_dir, tmp_path):
    model, tokenizer = tiny_model
    rows = _shard_rows(num_problems=3, simulations=6)
    train_critics(rows, str(tiny_model_dir), CFG, tmp_path / "critics", model, tokenizer)
    critics = CriticSet.load(tmp_path / "critics", model, tokenizer, batch_size=4)
    scores = critics.score(TEXTS)
    for kind in KINDS:
        assert scores[kind].shape == (len(TEXTS),)
        assert ((scores[kind] >= 0) & (scores[kind] <= 1)).all()
    critics.save(tmp_path / "again")
    again = CriticSet.load(tmp_path / "again", model, tokenizer, batch_size=4).score(TEXTS)
    assert all(np.array_equal(again[k], scores[k]) for k in KINDS)


def test_too_few_examples_skip_metrics_with_a_reason(tiny_model, tiny_model_dir, tmp_path):
    model, tokenizer = tiny_model
    one_problem = _shard_rows(num_problems=1, simulations=4)
    metrics = train_critics(one_problem, str(tiny_model_dir), CFG, tmp_path / "one", model, tokenizer)
    assert metrics["heldout_problems"] == []
    assert metrics["orm"]["auc"] is None
    assert metrics["orm"]["skipped"]["auc"] == "no held-out examples"
    nothing = train_critics([], str(tiny_model_dir), CFG, tmp_path / "none", model, tokenizer)
    assert not nothing["value"]["trained"] and nothing["texts"] == 0
    scores = CriticSet.load(tmp_path / "none", model, tokenizer).score(["x"])
    assert scores["orm"][0] == pytest.approx(0.5)  # untrained heads say 0.5


def test_load_critic_set_shares_the_policy_only_when_it_is_the_backbone(tiny_model, tiny_model_dir,
                                                                        tmp_path):
    model, tokenizer = tiny_model
    rows = _shard_rows(num_problems=2, simulations=4)
    train_critics(rows, str(tiny_model_dir), CFG, tmp_path / "own", model, tokenizer)
    shared = load_critic_set(tmp_path / "own", str(tiny_model_dir), model, tokenizer,
                             ModelConfig(), batch_size=4)
    assert shared.model is model
    # critics_{i+1} were fitted on policy_i; beside policy_{i+1} they load their own backbone
    next_policy = str(build_tiny_model(tmp_path / "policy_1", seed=1))
    apart = load_critic_set(tmp_path / "own", next_policy, model, tokenizer, ModelConfig(), 4)
    assert apart.model is not model
    assert np.allclose(apart.score(TEXTS)["value"], shared.score(TEXTS)["value"], atol=1e-5)
