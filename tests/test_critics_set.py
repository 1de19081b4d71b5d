import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_prefix_cache import prompts_for, smol_tiny, smol_tokenizer  # noqa: F401 fixtures
from tiny import build_tiny_model

from critics import KINDS, LOGPROB_STATS, CriticSet, backbone_features, train_head
from critics import features as features_module
from critics.critic_set import FeatureSet, linear_features, pick
from critics.features import encode_left_padded
from mcts import SearchParams, search
from mcts.fake import FakeCritic, FakePolicy, FakeVerifier
from pipeline.config import CriticsConfig, ModelConfig
from pipeline.run.atomic import write_jsonl
from pipeline.run.store import load_shards
from pipeline.stages.critics import load_critic_set, train_critics

# (prompt, completion) pairs as critics read them
STATES = [("Q: 1 + 1?\n", "A: 2\n"), ("a", ""),
          ("What is 12 + 30?\n", "Step 1: add the two numbers\nAnswer: 42\n"),
          ("<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>assistant\nhello"),
          ("", "Step 2: carry the 3 to the next column\n")]
PROMPTS, COMPLETIONS = [p for p, _ in STATES], [c for _, c in STATES]


def _features(model, tokenizer, states, batch_size=4, max_length=64, logprobs=True):
    return backbone_features(model, tokenizer, [p for p, _ in states], [c for _, c in states],
                             batch_size, max_length, logprobs=logprobs)


def test_batched_features_equal_one_by_one(tiny_model):
    model, tokenizer = tiny_model
    batched = _features(model, tokenizer, STATES)
    alone = [_features(model, tokenizer, [state], batch_size=1) for state in STATES]
    assert batched.hidden.shape == (len(STATES), model.config.hidden_size)
    assert batched.logprob.shape == (len(STATES), len(LOGPROB_STATS))
    assert torch.allclose(batched.hidden, torch.cat([a.hidden for a in alone]), atol=1e-5)
    assert torch.allclose(batched.logprob, torch.cat([a.logprob for a in alone]), atol=1e-4)


def test_logprob_features_are_the_completion_tokens_log_probs(tiny_model):
    model, tokenizer = tiny_model
    prompt, completion = STATES[2]
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    completion_ids = tokenizer(completion, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    by_hand = torch.tensor([logp[len(prompt_ids) - 1 + k, t] for k, t in enumerate(completion_ids)])
    got = _features(model, tokenizer, [STATES[2]]).logprob[0]
    assert dict(zip(LOGPROB_STATS, got.tolist())) == pytest.approx(
        {"mean": by_hand.mean().item(), "min": by_hand.min().item(),
         "sum": by_hand.sum().item(), "tokens": len(completion_ids)}, abs=1e-4)
    assert _features(model, tokenizer, [STATES[1]]).logprob[0].tolist() == [0, 0, 0, 0]  # none


def test_prompt_hidden_is_the_prompts_own_last_state(tiny_model):
    model, tokenizer = tiny_model
    both = _features(model, tokenizer, STATES[:4])
    alone = _features(model, tokenizer, [(prompt, "") for prompt, _ in STATES[:4]])
    assert torch.allclose(both.prompt_hidden, alone.hidden, atol=1e-5)
    assert not torch.allclose(both.prompt_hidden[0], both.hidden[0], atol=1e-3)


def test_a_base_model_gives_the_causal_lms_hidden_features(tiny_model, tiny_model_dir):
    from transformers import AutoModel

    model, tokenizer = tiny_model
    base = AutoModel.from_pretrained(tiny_model_dir).eval()
    assert torch.allclose(_features(base, tokenizer, STATES, logprobs=False).hidden,
                          _features(model, tokenizer, STATES).hidden, atol=1e-6)
    with pytest.raises(ValueError, match="state_features=confidence need a causal LM"):
        _features(base, tokenizer, STATES, logprobs=True)


def test_long_texts_keep_their_tail(tiny_model):
    model, tokenizer = tiny_model
    long = ("x" * 50, "Answer: 42\n")  # one token per character
    cut = _features(model, tokenizer, [long], batch_size=1, max_length=11)
    assert torch.allclose(cut.hidden, _features(model, tokenizer, [("", "Answer: 42\n")]).hidden,
                          atol=1e-5)
    assert cut.logprob[0, LOGPROB_STATS.index("tokens")] == 10  # the first kept token: no predictor
    assert encode_left_padded(tokenizer, [long[0]], [long[1]], 11).input_ids.shape == (1, 11)


def _critic_set(model, tokenizer, batch_size, orm_features="hidden"):
    found = _features(model, tokenizer, STATES, batch_size=8)
    targets = torch.linspace(0, 1, len(STATES))
    uses = {"value": "hidden", "prm": "hidden", "orm": orm_features}
    heads = {kind: train_head(pick(found, uses[kind]), targets, "bce", 1e-2, 20, 2, seed=i,
                              linear_features=linear_features(uses[kind], 32))[0]
             for i, kind in enumerate(KINDS)}
    return CriticSet(model, tokenizer, heads, max_length=64, batch_size=batch_size, features=uses)


@pytest.mark.parametrize("orm_features", ["hidden", "confidence"])
def test_batched_scores_equal_one_by_one(tiny_model, orm_features):
    critics = _critic_set(*tiny_model, batch_size=3, orm_features=orm_features)
    batched = critics.score(PROMPTS, COMPLETIONS)
    assert set(batched) == set(KINDS)
    assert np.ptp(batched["orm"]) > 1e-3  # trained heads: the scores differ between texts
    for i, (prompt, completion) in enumerate(STATES):
        alone = critics.score([prompt], [completion])
        for kind in KINDS:
            assert alone[kind][0] == pytest.approx(batched[kind][i], abs=1e-5)
    assert set(critics.score(PROMPTS[:2], COMPLETIONS[:2], ("prm",))) == {"prm"}


def test_orm_scorer_scores_prompt_plus_completion(tiny_model):
    critics = _critic_set(*tiny_model, batch_size=4, orm_features="confidence")
    got = critics.orm_scorer()(PROMPTS[:2], COMPLETIONS[:2])
    assert got == pytest.approx(critics.score(PROMPTS[:2], COMPLETIONS[:2], ("orm",))["orm"].tolist(),
                                abs=1e-6)


def test_an_orm_head_must_match_the_features_it_reads(tiny_model):
    model, tokenizer = tiny_model
    hidden_head = _critic_set(model, tokenizer, 4).heads["orm"]
    with pytest.raises(ValueError, match="expects features of size 32, the backbone gives 36"):
        CriticSet(model, tokenizer, {"orm": hidden_head}, 64, 4, features={"orm": "confidence"})
    with pytest.raises(ValueError, match="unknown features 'entropy'; allowed: confidence, hidden"):
        CriticSet(model, tokenizer, {"orm": hidden_head}, 64, 4, features={"orm": "entropy"})


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
        assert meta["features"] == "confidence"  # the default for every head
        assert meta["hidden_size"] == 4 + 32 and meta["max_length"] == 128
        assert meta["linear_features"] == 32
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
    scores = critics.score(PROMPTS, COMPLETIONS)
    for kind in KINDS:
        assert scores[kind].shape == (len(STATES),)
        assert ((scores[kind] >= 0) & (scores[kind] <= 1)).all()
    critics.save(tmp_path / "again")
    again = CriticSet.load(tmp_path / "again", model, tokenizer, batch_size=4).score(PROMPTS, COMPLETIONS)
    assert all(np.array_equal(again[k], scores[k]) for k in KINDS)


def test_heads_saved_before_orm_features_existed_read_hidden_states(tiny_model, tiny_model_dir,
                                                                    tmp_path):
    model, tokenizer = tiny_model
    cfg = replace(CFG, orm_features=FeatureSet.hidden, state_features=FeatureSet.hidden)
    train_critics(_shard_rows(num_problems=2, simulations=4), str(tiny_model_dir), cfg,
                  tmp_path / "critics", model, tokenizer)
    scores = CriticSet.load(tmp_path / "critics", model, tokenizer).score(PROMPTS, COMPLETIONS)
    for kind in KINDS:  # as a run from before the key wrote them
        meta_path = tmp_path / "critics" / kind / "meta.json"
        meta = json.loads(meta_path.read_text())
        del meta["features"]
        meta_path.write_text(json.dumps(meta))
    old = CriticSet.load(tmp_path / "critics", model, tokenizer)
    assert old.features == {kind: "hidden" for kind in KINDS}
    assert np.array_equal(old.score(PROMPTS, COMPLETIONS)["orm"], scores["orm"])


def test_state_features_choose_what_value_and_prm_read(tiny_model, tiny_model_dir, tmp_path):
    """critics.state_features=confidence: value and PRM read a state's log-prob statistics (MLP)
    and the problem's hidden state (linear term), and the saved set scores them so."""
    model, tokenizer = tiny_model
    cfg = replace(CFG, state_features=FeatureSet.confidence)
    metrics = train_critics(_shard_rows(), str(tiny_model_dir), cfg, tmp_path / "critics", model,
                            tokenizer)
    assert {metrics[k]["features"] for k in ("value", "prm")} == {"confidence"}
    critics = CriticSet.load(tmp_path / "critics", model, tokenizer, batch_size=4)
    assert critics.features == {"value": "confidence", "prm": "confidence", "orm": "confidence"}
    size = model.config.hidden_size
    for kind in ("value", "prm"):
        assert critics.heads[kind].net[0].in_features == len(LOGPROB_STATS)  # the MLP: stats only
        assert critics.heads[kind].linear.in_features == size  # the problem's term
    found = _features(model, tokenizer, STATES)
    expected = {kind: critics.heads[kind].predict(pick(found, FeatureSet.confidence)).numpy()
                for kind in ("value", "prm")}
    scores = critics.score(PROMPTS, COMPLETIONS)
    for kind, by_hand in expected.items():
        assert scores[kind] == pytest.approx(by_hand, abs=1e-5)
    hidden = train_critics(_shard_rows(), str(tiny_model_dir), replace(CFG, state_features=FeatureSet.hidden),
                           tmp_path / "hidden", model, tokenizer)
    assert hidden["value"]["features"] == "hidden"
    assert CriticsConfig().state_features == FeatureSet.confidence  # the default


def test_too_few_examples_skip_metrics_with_a_reason(tiny_model, tiny_model_dir, tmp_path):
    model, tokenizer = tiny_model
    one_problem = _shard_rows(num_problems=1, simulations=4)
    metrics = train_critics(one_problem, str(tiny_model_dir), CFG, tmp_path / "one", model, tokenizer)
    assert metrics["heldout_problems"] == []
    assert metrics["orm"]["auc"] is None
    assert metrics["orm"]["skipped"]["auc"] == "no held-out examples"
    nothing = train_critics([], str(tiny_model_dir), CFG, tmp_path / "none", model, tokenizer)
    assert not nothing["value"]["trained"] and nothing["texts"] == 0
    scores = CriticSet.load(tmp_path / "none", model, tokenizer).score(["x"], [""])
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
    assert np.allclose(apart.score(PROMPTS, COMPLETIONS)["value"], shared.score(PROMPTS, COMPLETIONS)["value"], atol=1e-5)


@pytest.mark.parametrize("which", ["tiny_model", "smol_tiny"])
def test_texts_sharing_a_prompt_get_the_features_of_one_pass_each(which, request):
    """The prompt runs once for all its completions (KV cache copied, completions right-padded)
    and each text gets what a pass of its own gives: the left-padded path, text by text. With
    SmolLM2's BPE too, whose "\\n\\n" and merged spaces the per-character tokenizer hides."""
    model, tokenizer = request.getfixturevalue(which)
    prompts = prompts_for(tokenizer)[:2] if which == "smol_tiny" else PROMPTS[:2]
    steps = ["", "Step 1: 3 + 4 = 7\n", "Step 1: 3 + 4 = 7\n\nStep 2: 7 + 5 = 12\n", " Answer: 12",
             "x"]
    texts = [(p, c) for p in prompts for c in steps]
    shared = _features(model, tokenizer, texts, batch_size=3, max_length=512)
    n = len(texts)
    alone = features_module._Rows([None] * n, [None] * n, [None] * n)
    for i in range(n):
        features_module._left_padded(model, model.get_output_embeddings(), tokenizer,
                                     [p for p, _ in texts], [c for _, c in texts], [i], 1, 512, alone)
    assert torch.allclose(shared.hidden, torch.stack(alone.hidden), atol=1e-4)
    assert torch.allclose(shared.prompt_hidden, torch.stack(alone.prompt), atol=1e-4)
    assert torch.allclose(shared.logprob, torch.stack(alone.logprob), atol=1e-3)
    assert shared.logprob[0].tolist() == [0, 0, 0, 0] and shared.logprob[1, 3] > 0  # count
