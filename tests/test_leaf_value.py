"""The leaf value (README, "Leaf value"): one definition for training and evaluation.

A weighted mean of the parts that exist: value, PRM, ORM on steps + fast rollout (before any
critic: the policy's confidence, exp(mean token log-prob), terminal and non-terminal alike),
and the verifier on steps + rollout on training problems only."""

import math
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from mcts.types import EvalRequest
from pipeline.compose import compose_config
from pipeline.config import CriticWeights
from pipeline.decoding.tree_search import LeafScorer, Rollout, SearchModels, confidence, eval_search
from pipeline.tasks.prompt import render_prompts


class FixedCritics:
    """value 0.4 and PRM 0.6 on any state; ORM 0.9 on any steps + rollout. Records its texts."""

    model = None  # no backbone of its own: never the policy, so leaves go through score()

    def __init__(self):
        self.calls = []

    def score(self, prompts, completions, kinds):
        self.calls.append((tuple(kinds), list(completions)))
        fixed = {"value": 0.4, "prm": 0.6, "orm": 0.9}
        return {k: np.full(len(completions), fixed[k]) for k in kinds}


@pytest.fixture
def cfg(debug_overrides):
    return compose_config(debug_overrides)


def _requests(terminal: bool):
    return [EvalRequest(0, 3, "Q: 1+1?\n", ["1 + 1 = 2\n"], terminal, seed=1, logprob=-2.0,
                        num_tokens=8)]


def _scorer(cfg, tiny_model, critics=None, reward_fn=None):
    model, tokenizer = tiny_model
    return LeafScorer(cfg, SearchModels(model, tokenizer, critics=critics), reward_fn=reward_fn)


def test_confidence_is_one_formula_for_terminal_and_non_terminal():
    r = _requests(terminal=True)[0]
    assert confidence(r, Rollout("", 0, 0.0, False)) == pytest.approx(math.exp(-2.0 / 8))
    ro = Rollout(" so 2\n", 4, -1.0, True)  # 4 tokens of mean log-prob -1
    assert confidence(r, ro) == pytest.approx(math.exp((-2.0 - 4.0) / 12))


def test_evaluation_terminal_without_critics_is_scored_like_any_leaf(cfg, tiny_model):
    scorer = _scorer(cfg, tiny_model)
    leaf = scorer.evaluate(_requests(terminal=True))[0]
    assert leaf.total == pytest.approx(math.exp(-2.0 / 8))  # its confidence, not a flat 0.5
    assert leaf.orm == pytest.approx(leaf.total) and leaf.rollout == 0.0  # no verifier at eval


def test_evaluation_non_terminal_without_critics_uses_steps_and_rollout(cfg, tiny_model):
    scorer = _scorer(cfg, tiny_model)
    scorer.pending[(0, "1 + 1 = 2\n")] = Rollout("Answer: 2", 3, -0.5, True)
    leaf = scorer.evaluate(_requests(terminal=False))[0]
    assert leaf.total == pytest.approx(math.exp((-2.0 - 1.5) / 11))


def test_evaluation_with_critics_fills_the_orm_slot_only(cfg, tiny_model):
    critics = FixedCritics()
    scorer = _scorer(cfg, tiny_model, critics=critics)
    cfg.critics.trained_weights = CriticWeights(value=0.3, prm=0.2, orm=0.2, rollout=0.3)
    for terminal in (True, False):
        scorer.pending[(0, "1 + 1 = 2\n")] = Rollout(" done", 2, -0.1, True)
        leaf = scorer.evaluate(_requests(terminal))[0]
        assert (leaf.value, leaf.prm, leaf.orm, leaf.rollout) == (0.4, 0.6, 0.9, 0.0)
        # the ORM weighs 0.2 of 0.7, as configured (not 0.2 + 0.3 through the rollout slot)
        assert leaf.total == pytest.approx((0.3 * 0.4 + 0.2 * 0.6 + 0.2 * 0.9) / 0.7)


def test_training_adds_the_verifier_on_the_rollout(cfg, tiny_model):
    seen = []

    def reward(tree_index, solution):
        seen.append(solution)
        return 1.0

    scorer = _scorer(cfg, tiny_model, reward_fn=reward)
    scorer.pending[(0, "1 + 1 = 2\n")] = Rollout("Answer: 2", 3, -0.5, True)
    leaf = scorer.evaluate(_requests(terminal=False))[0]
    conf = math.exp((-2.0 - 1.5) / 11)
    w = cfg.critics.weights
    assert seen == ["1 + 1 = 2\nAnswer: 2"]
    assert (leaf.orm, leaf.rollout) == (pytest.approx(conf), 1.0)
    assert leaf.total == pytest.approx((w.orm * conf + w.rollout * 1.0) / (w.orm + w.rollout))
    critics = FixedCritics()  # with critics: all four parts, the trained weights
    scorer = _scorer(cfg, tiny_model, critics=critics, reward_fn=reward)
    scorer.pending[(0, "1 + 1 = 2\n")] = Rollout("Answer: 2", 3, -0.5, True)
    leaf = scorer.evaluate(_requests(terminal=False))[0]
    t = cfg.critics.trained_weights
    assert leaf.total == pytest.approx((t.value * 0.4 + t.prm * 0.6 + t.orm * 0.9 + t.rollout)
                                       / (t.value + t.prm + t.orm + t.rollout))
    assert critics.calls[-1] == (("orm",), ["1 + 1 = 2\nAnswer: 2"])  # ORM on steps + rollout


def test_eval_search_terminals_get_their_confidence(cfg, tiny_model):
    cfg.search.max_depth = 1  # every child terminal
    cfg.search.simulations = 2
    model, tokenizer = tiny_model
    prompts = render_prompts(tokenizer, ["What is 1 + 1?"])
    trees, _ = eval_search(prompts, cfg, SearchModels(model, tokenizer))
    tree = trees[0]
    for node in range(1, tree.num_nodes):
        assert tree.terminal[node]
        expected = math.exp(tree.logprob[node] / tree.num_tokens[node])
        assert tree.total[node] == pytest.approx(expected)


def test_readme_leaf_value_table_names_every_part_with_its_default_weights():
    """The README's table is the leaf value's documentation: one row per CriticWeights field,
    whose "before critics" and "with critics" columns are the two defaults ("absent" = 0)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Leaf value", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells
    cfg = compose_config([])
    parts = [f.name for f in fields(CriticWeights)]
    assert sorted(rows) == sorted(parts)
    for part in parts:
        before, trained = (0.0 if c == "absent" else float(c) for c in rows[part][2:4])
        assert before == getattr(cfg.critics.weights, part), part
        assert trained == getattr(cfg.critics.trained_weights, part), part
