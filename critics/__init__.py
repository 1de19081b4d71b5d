"""Critics: value, PRM and ORM heads on one LM backbone, their targets from search trees and
their metrics, and the DPO implicit reward. Takes models and plain values; no pipeline imports."""

from critics.critic_set import CriticSet, Scorer
from critics.features import LOGPROB_STATS, Features, backbone_features
from critics.heads import ScalarHead, load_head, save_head, train_head
from critics.implicit import (
    ImplicitCritic,
    completion_tokens,
    credit_map_html,
    implicit_reward,
    implicit_score,
    option_rewards,
    token_rewards,
)
from critics.targets import KINDS, Example, critic_examples, split_by_problem

__all__ = [
    "KINDS",
    "LOGPROB_STATS",
    "CriticSet",
    "Example",
    "Features",
    "ImplicitCritic",
    "ScalarHead",
    "Scorer",
    "backbone_features",
    "completion_tokens",
    "credit_map_html",
    "critic_examples",
    "implicit_reward",
    "implicit_score",
    "load_head",
    "option_rewards",
    "save_head",
    "split_by_problem",
    "token_rewards",
    "train_head",
]
