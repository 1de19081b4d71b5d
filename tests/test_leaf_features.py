"""critics.leaf_features=generation: search scores a leaf from the features its own decoding pass
computed (hidden states, token log-probs), with no backbone forward per leaf, and those features
are the ones a teacher-forced pass over the leaf's text gives wherever the text re-tokenizes to
the sampled ids (always with the per-character tokenizer; SmolLM2's BPE can merge at a seam)."""

from __future__ import annotations

import pytest
import torch
from test_prefix_cache import prompts_for, smol_tiny, smol_tokenizer, varied  # noqa: F401 fixtures

import critics.critic_set as critic_set
from critics.critic_set import CriticSet, FeatureSet, feature_width, linear_features
from critics.features import backbone_features
from critics.heads import ScalarHead
from mcts.types import EvalRequest, ExpandRequest
from pipeline.compose import compose_config
from pipeline.decoding import tree_search
from pipeline.decoding.tree_search import LeafScorer, SearchModels, eval_search
from pipeline.lm.generation import generate

KINDS = {"value": FeatureSet.hidden, "prm": FeatureSet.hidden, "orm": FeatureSet.confidence}


def random_critics(model, tokenizer, state_features: FeatureSet = FeatureSet.hidden) -> CriticSet:
    """Heads with small random weights: their scores move with every feature. state_features:
    what value and PRM read (critics.state_features)."""
    torch.manual_seed(0)
    size = model.config.hidden_size
    heads = {}
    uses = KINDS | {"value": state_features, "prm": state_features}
    for kind, features in uses.items():
        head = ScalarHead(feature_width(features, size), linear_features=linear_features(features, size))
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.2)
        head.feature_std.fill_(10.0)  # log-prob sums of tens of tokens: keep the sigmoid unsaturated
        heads[kind] = head
    return CriticSet(model, tokenizer, heads, max_length=512, batch_size=4,
                     features={k: v.value for k, v in uses.items()})


def scorer_for(debug_overrides, model, tokenizer, mode: str, critics=None) -> LeafScorer:
    cfg = compose_config([*debug_overrides, f"critics.leaf_features={mode}",
                          "search.temperature=1.0"])
    critics = critics or random_critics(model, tokenizer)
    return LeafScorer(cfg, SearchModels(model, tokenizer, critics=critics), reward_fn=None)


def expand_roots(scorer: LeafScorer, prompts: list[str]) -> list[EvalRequest]:
    """Three options under each root, as evaluation requests for the new leaves."""
    requests = [ExpandRequest(t, 0, p, [], 3, seed=t) for t, p in enumerate(prompts)]
    leaves = []
    for r, options in zip(requests, scorer.expand(requests)):
        for k, o in enumerate(o for o in options if o.text.strip()):  # mcts drops blank ones
            leaves.append(EvalRequest(r.tree_index, k + 1, r.prompt, [o.text], o.terminal,
                                      logprob=o.logprob, num_tokens=o.num_tokens))
    return leaves


def same_ids(tokenizer, prompt: str, text: str, ids: list[int]) -> bool:
    return tokenizer(prompt + text, add_special_tokens=False).input_ids == (
        tokenizer(prompt, add_special_tokens=False).input_ids + list(ids))


@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
def test_generation_features_are_the_teacher_forced_ones(which, request, debug_overrides,
                                                        monkeypatch):
    model, tokenizer = request.getfixturevalue(which)
    scorer = scorer_for(debug_overrides, model, tokenizer, "generation")
    assert scorer.generation_features
    sampled = {}  # option text -> the ids generation sampled for it

    def recording(*args, **kwargs):
        gens = generate(*args, **kwargs)
        sampled.update({g.text: g.token_ids for g in gens})
        return gens

    monkeypatch.setattr(tree_search, "generate", recording)
    prompts = prompts_for(tokenizer)[:3]
    leaves = expand_roots(scorer, prompts)
    compared = rollouts = 0
    for r in leaves:
        key = (r.tree_index, r.steps[0])
        leaf, rollout = scorer.features.leaves[key], scorer.pending.get(key)
        state = backbone_features(model, tokenizer, [r.prompt], [r.steps[0]], 1, 512, logprobs=True)
        assert scorer.features.problem_hidden[r.tree_index] == pytest.approx(
            state.prompt_hidden[0], abs=1e-4)
        if not same_ids(tokenizer, r.prompt, r.steps[0], sampled[r.steps[0]]):
            continue  # a BPE seam: the text re-tokenizes to other ids than those sampled
        compared += 1
        assert leaf.state_hidden == pytest.approx(state.hidden[0], abs=1e-4)
        assert leaf.state.row() == pytest.approx(state.logprob[0].tolist(), abs=1e-4)
        # ids = text per char, unless the (sampled) rollout drew a special token: no text
        if rollout is not None and rollout.tokens and which == "varied" and rollout.tokens == len(
                tokenizer(rollout.text, add_special_tokens=False).input_ids):
            full = backbone_features(model, tokenizer, [r.prompt], [r.steps[0] + rollout.text], 1,
                                     512, logprobs=True)
            assert leaf.end_hidden == pytest.approx(full.hidden[0], abs=1e-4)
            assert leaf.end.row() == pytest.approx(full.logprob[0].tolist(), abs=1e-4)
            rollouts += 1
    assert compared > 0 and (rollouts > 0 or which != "varied")


@pytest.mark.parametrize("state_features", list(FeatureSet))
def test_leaves_are_scored_without_a_backbone_pass(debug_overrides, monkeypatch, request,
                                                   state_features):
    model, tokenizer = request.getfixturevalue("varied")
    critics = random_critics(model, tokenizer, state_features)
    prompts = prompts_for(tokenizer)[:3]
    backbone = scorer_for(debug_overrides, model, tokenizer, "backbone", critics)
    expected = backbone.evaluate(expand_roots(backbone, prompts))
    assert backbone.leaf_scoring == {"generation": 0, "backbone": len(expected)}

    own = scorer_for(debug_overrides, model, tokenizer, "generation", critics)
    leaves = expand_roots(own, prompts)

    def no_backbone(*args, **kwargs):
        raise AssertionError("a backbone pass while scoring leaves")

    monkeypatch.setattr(critic_set, "backbone_features", no_backbone)
    counts = {key: leaf.state.count for key, leaf in own.features.leaves.items()}
    rollouts = dict(own.pending)  # the fused rollouts, sampled: they may hold special tokens too
    found = own.evaluate(leaves)
    assert own.leaf_scoring == {"generation": len(found), "backbone": 0}
    # the same options (same seeds), scored alike where the per-character text is the sampled
    # ids (a random model also samples special tokens, which the text drops)
    assert [f.tokens for f in found] == [e.tokens for e in expected]
    def text_is_ids(key) -> bool:
        rollout = rollouts.get(key)
        return counts[key] == len(tokenizer(key[1]).input_ids) and (
            rollout is None or rollout.tokens == len(tokenizer(rollout.text).input_ids))

    alike = [i for i, r in enumerate(leaves) if text_is_ids((r.tree_index, r.steps[0]))]
    assert len(alike) >= len(leaves) // 2
    for kind in ("value", "prm", "orm", "total"):
        assert [getattr(found[i], kind) for i in alike] == pytest.approx(
            [getattr(expected[i], kind) for i in alike], abs=1e-3)
        assert len({round(getattr(f, kind), 4) for f in found}) > 1  # the heads tell leaves apart


def test_a_separate_critic_backbone_is_scored_by_its_own_pass(debug_overrides, request, tiny_model):
    """Critics on another model than the policy cannot use the policy's hidden states."""
    model, tokenizer = request.getfixturevalue("varied")
    other, _ = tiny_model
    scorer = scorer_for(debug_overrides, model, tokenizer, "generation",
                        random_critics(other, tokenizer))
    assert not scorer.generation_features
    found = scorer.evaluate(expand_roots(scorer, prompts_for(tokenizer)[:2]))
    assert scorer.leaf_scoring == {"generation": 0, "backbone": len(found)} and found


def test_a_whole_search_scores_its_leaves_from_generation(debug_overrides, request):
    model, tokenizer = request.getfixturevalue("varied")
    cfg = compose_config([*debug_overrides, "search.simulations=4"])
    trees, scorer = eval_search(prompts_for(tokenizer)[:2], cfg,
                                SearchModels(model, tokenizer, critics=random_critics(model, tokenizer)))
    assert trees and scorer.leaf_scoring["generation"] > 0
    assert scorer.leaf_scoring["backbone"] == 0
    assert not scorer.features.leaves  # every recorded leaf was evaluated


@pytest.mark.parametrize("state_features", list(FeatureSet))
def test_options_read_off_rollouts_are_scored_from_generation(debug_overrides, request,
                                                              state_features):
    """search.reuse_rollouts: an option read off its parent's rollout has no hidden state of its
    own, so rollouts are reused only when no head reads one; its leaf is still scored from the
    generation pass's log-probs, with no backbone pass."""
    model, tokenizer = request.getfixturevalue("varied")
    cfg = compose_config([*debug_overrides, "search.simulations=4", "search.reuse_rollouts=true"])
    critics = random_critics(model, tokenizer, state_features)
    trees, scorer = eval_search(prompts_for(tokenizer)[:2], cfg,
                                SearchModels(model, tokenizer, critics=critics))
    if state_features == FeatureSet.hidden:
        assert scorer.reuse is None
    else:
        assert scorer.reuse.reused > 0
    assert scorer.leaf_scoring["generation"] > 0 and scorer.leaf_scoring["backbone"] == 0
    assert not scorer.features.leaves
