"""The trained critics as one scorer: a backbone (any HF causal LM or base model, usually the
policy already in memory) and the value, PRM and ORM heads on its features. One backbone pass
per text serves every head."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path

import numpy as np
import torch

from critics.features import LOGPROB_STATS, Features, backbone_features
from critics.heads import ScalarHead, load_head, read_meta, save_head
from critics.targets import KINDS

Scorer = Callable[[list[str], list[str]], list[float]]  # (prompts, completions) -> scores


class FeatureSet(str, Enum):
    """What a head reads (critics.state_features for value and PRM, critics.orm_features)."""

    # the completion's token log-prob statistics (MLP), then the prompt's last hidden state as a
    # linear per-problem term that cannot reorder the answers to one problem
    confidence = "confidence"
    hidden = "hidden"  # the backbone's last hidden state


def backbone_of(directory: str | os.PathLike) -> str:
    """The backbone the saved heads were trained on: a checkpoint directory, recorded relative
    to `directory` when it lay in the same run (so a moved run still finds it), or a model id
    (resolved by the caller)."""
    backbone = read_meta(Path(directory) / KINDS[0])["backbone"]
    beside = Path(directory) / backbone  # an absolute `backbone` stays itself
    return os.path.normpath(beside) if beside.is_dir() else backbone


def feature_width(features: FeatureSet, hidden_size: int) -> int:
    return len(LOGPROB_STATS) + hidden_size if features == FeatureSet.confidence else hidden_size


def linear_features(features: FeatureSet, hidden_size: int) -> int:
    """How many trailing feature columns a head of this kind takes linearly."""
    return hidden_size if features == FeatureSet.confidence else 0


class CriticSet:
    def __init__(self, model, tokenizer, heads: dict[str, ScalarHead], max_length: int,
                 batch_size: int, meta: dict[str, dict] | None = None,
                 features: dict[str, FeatureSet | str] | None = None):
        """`features[kind]`: what each head reads (default hidden)."""
        given = {kind: FeatureSet.hidden for kind in heads} | (features or {})
        self.features: dict[str, FeatureSet] = {}
        for kind, head in heads.items():
            if given[kind] not in FeatureSet.__members__:
                raise ValueError(f"critic head {kind!r} reads unknown features {given[kind]!r}; "
                                 f"allowed: {', '.join(FeatureSet.__members__)}")
            self.features[kind] = FeatureSet(given[kind])
            width = feature_width(self.features[kind], model.config.hidden_size)
            if (head.hidden_size, head.linear_features) != (
                    width, linear_features(self.features[kind], model.config.hidden_size)):
                raise ValueError(f"critic head {kind!r} expects features of size {head.hidden_size}, "
                                 f"the backbone gives {width} for {self.features[kind].value!r} features: "
                                 "it was trained on another backbone or other features")
        self.model, self.tokenizer, self.heads = model, tokenizer, heads
        self.max_length, self.batch_size = max_length, batch_size
        self.meta = meta or {kind: {} for kind in heads}

    @classmethod
    def load(cls, directory: str | os.PathLike, model, tokenizer, batch_size: int = 32) -> CriticSet:
        """Heads from `directory/{value,prm,orm}/`; features from the given model, which must be
        the backbone the heads were trained on (meta.json names it)."""
        heads, meta = {}, {}
        for kind in KINDS:
            heads[kind], meta[kind] = load_head(Path(directory) / kind)
        max_length = meta[KINDS[0]]["max_length"]
        # Heads saved before ORM features were configurable have no "features": they read hidden.
        features = {kind: meta[kind].get("features", FeatureSet.hidden.value) for kind in KINDS}
        return cls(model, tokenizer, heads, max_length, batch_size, meta, features)

    def save(self, directory: str | os.PathLike) -> None:
        for kind, head in self.heads.items():
            save_head(head, Path(directory) / kind, {**self.meta[kind], "kind": kind,
                                                     "max_length": self.max_length,
                                                     "features": self.features[kind].value})

    def score(self, prompts: Sequence[str], completions: Sequence[str],
              kinds: Sequence[str] = KINDS) -> dict[str, np.ndarray]:
        """Scores in [0, 1] per kind, one per prompt + completion."""
        logprobs = any(self.features[kind] == FeatureSet.confidence for kind in kinds)
        found = backbone_features(self.model, self.tokenizer, prompts, completions,
                                  self.batch_size, self.max_length, logprobs=logprobs)
        return self.score_features(found, kinds)

    @torch.no_grad()
    def score_features(self, found: Features, kinds: Sequence[str] = KINDS) -> dict[str, np.ndarray]:
        """Scores in [0, 1] per kind from features computed elsewhere (the search's own decoding
        pass, when the backbone is the policy: pipeline.decoding.tree_search)."""
        return {kind: self.heads[kind].predict(pick(found, self.features[kind])).numpy()
                for kind in kinds}

    def orm_scorer(self) -> Scorer:
        """For best-of-N selection: the ORM score of each prompt + completion."""
        def orm(prompts: list[str], completions: list[str]) -> list[float]:
            return self.score(prompts, completions, ("orm",))["orm"].tolist()

        return orm


def pick(found: Features, features: FeatureSet):
    """The feature matrix a head reads."""
    if features == FeatureSet.confidence:
        return torch.cat([found.logprob, found.prompt_hidden], dim=1)
    return found.hidden
