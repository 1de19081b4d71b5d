"""The trained critics as one scorer: a backbone (any HF causal LM or base model, usually the
policy already in memory) and the value, PRM and ORM heads on its features. One backbone pass
per text serves every head."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from critics.features import hidden_features
from critics.heads import ScalarHead, load_head, read_meta, save_head
from critics.targets import KINDS, state_text

Scorer = Callable[[list[str], list[str]], list[float]]  # (prompts, completions) -> scores


def backbone_of(directory: str | os.PathLike) -> str:
    """The backbone the saved heads were trained on (a checkpoint path or model id)."""
    return read_meta(Path(directory) / KINDS[0])["backbone"]


class CriticSet:
    def __init__(self, model, tokenizer, heads: dict[str, ScalarHead], max_length: int,
                 batch_size: int, meta: dict[str, dict] | None = None):
        hidden = model.config.hidden_size
        for kind, head in heads.items():
            if head.hidden_size != hidden:
                raise ValueError(f"critic head {kind!r} expects features of size {head.hidden_size}, "
                                 f"the backbone gives {hidden}: it was trained on another backbone")
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
        return cls(model, tokenizer, heads, max_length, batch_size, meta)

    def save(self, directory: str | os.PathLike) -> None:
        for kind, head in self.heads.items():
            save_head(head, Path(directory) / kind, {**self.meta[kind], "kind": kind,
                                                     "max_length": self.max_length})

    def score(self, texts: Sequence[str], kinds: Sequence[str] = KINDS) -> dict[str, np.ndarray]:
        """Scores in [0, 1] per kind, one per text (texts as `state_text` builds them)."""
        features = hidden_features(self.model, self.tokenizer, texts, self.batch_size,
                                   self.max_length)
        return {kind: self.heads[kind].predict(features).numpy() for kind in kinds}

    def orm_scorer(self) -> Scorer:
        """For best-of-N selection: the ORM score of each prompt + completion."""
        def orm(prompts: list[str], completions: list[str]) -> list[float]:
            texts = [state_text(p, [c]) for p, c in zip(prompts, completions, strict=True)]
            return self.score(texts, ("orm",))["orm"].tolist()

        return orm
