"""The critics stage: value, PRM and ORM heads trained on one iteration's search trees.

Features come from one frozen backbone (the iteration's policy unless critics.backbone names
another), computed once per distinct text; the heads train on them in milliseconds. Problems
are split into train and held-out, so the held-out metrics judge critics on unseen problems.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from critics import KINDS, CriticSet, Example, critic_examples, split_by_problem, train_head
from critics.features import hidden_features
from critics.metrics import accuracy, auc, expected_calibration_error, mse, precision_recall
from critics.targets import heldout_problems
from pipeline.atomic import atomic_dir, read_jsonl, write_json
from pipeline.config import CriticsConfig, ModelConfig, to_dict
from pipeline.models import load_model

LOSS = {"value": "mse", "prm": "bce", "orm": "bce"}  # value regresses Q; PRM/ORM are probabilities


def load_search_rows(search_dir: str | Path) -> list[dict]:
    """Every row of `search_dir/shard_*.jsonl`, shards in name order."""
    return [row for shard in sorted(Path(search_dir).glob("shard_*.jsonl"))
            for row in read_jsonl(shard)]


def heldout_metrics(scores, targets) -> dict:
    """Every metric for one critic on its held-out examples; None with a reason where the
    examples cannot support it."""
    precision, recall = precision_recall(scores, targets)
    found = {"auc": auc(scores, targets), "accuracy": accuracy(scores, targets),
             "mse": mse(scores, targets), "ece": expected_calibration_error(scores, targets),
             "precision": precision, "recall": recall}
    reasons = {"auc": "held-out targets are all one class",
               "precision": "no held-out score >= 0.5", "recall": "no held-out target >= 0.5"}
    if len(targets) == 0:
        reasons = dict.fromkeys(found, "no held-out examples")
    found["skipped"] = {name: reasons[name] for name, value in found.items() if value is None}
    return found


def _rows_of(features: torch.Tensor, index: dict[str, int], examples: Sequence[Example]):
    return features[torch.tensor([index[e.text] for e in examples], dtype=torch.long)]


def train_critics(rows: Sequence[dict], policy_dir: str, cfg: CriticsConfig, out_dir: Path,
                  model=None, tokenizer=None, model_cfg: ModelConfig | None = None) -> dict:
    """Train the three heads on the trees in `rows`, write `out_dir/{value,prm,orm}/`
    (head.safetensors + meta.json) and `out_dir/metrics.json` in one atomic rename, and return
    the metrics: per kind, example counts, train losses and held-out metrics.

    model/tokenizer: the backbone, if already loaded (it must be cfg.backbone or the policy).
    model_cfg: dtype/device to load the backbone with otherwise (default: CPU float32).
    """
    start = time.perf_counter()
    backbone = cfg.backbone or policy_dir
    if model is None:
        model, tokenizer = load_model(replace(model_cfg or ModelConfig(), name=backbone))
    examples = critic_examples(rows)
    problem_ids = sorted({str(row["problem_id"]) for row in rows})
    texts = sorted({e.text for kind in KINDS for e in examples[kind]})  # value and PRM share most
    feature_start = time.perf_counter()
    features = hidden_features(model, tokenizer, texts, cfg.score_batch_size, cfg.max_length)
    feature_seconds = time.perf_counter() - feature_start
    index = {text: i for i, text in enumerate(texts)}
    heads, meta, metrics = {}, {}, {}
    for kind in KINDS:
        train, heldout = split_by_problem(examples[kind], cfg.heldout_fraction, cfg.seed, problem_ids)
        heads[kind], losses = train_head(_rows_of(features, index, train), [e.target for e in train],
                                         LOSS[kind], cfg.learning_rate, cfg.epochs, cfg.batch_size,
                                         cfg.seed)
        scores = heads[kind].predict(_rows_of(features, index, heldout)).numpy()
        metrics[kind] = {"train_examples": len(train), "heldout_examples": len(heldout),
                         "trained": bool(train), "loss": LOSS[kind],
                         "train_loss_first": losses[0] if losses else None,
                         "train_loss_last": losses[-1] if losses else None,
                         **heldout_metrics(scores, [e.target for e in heldout])}
        meta[kind] = {"backbone": str(backbone), "hidden_size": model.config.hidden_size,
                      "examples": {"train": len(train), "heldout": len(heldout)},
                      "metrics": metrics[kind], "config": to_dict(cfg)}
    critic_set = CriticSet(model, tokenizer, heads, cfg.max_length, cfg.score_batch_size, meta)
    heldout = heldout_problems(problem_ids, cfg.heldout_fraction, cfg.seed)
    result = {**metrics, "backbone": str(backbone), "problems": len(problem_ids),
              "heldout_problems": sorted(heldout), "texts": len(texts),
              "seconds": {"features": round(feature_seconds, 3),
                          "total": round(time.perf_counter() - start, 3)},
              "features_per_s": round(len(texts) / feature_seconds, 1) if feature_seconds else None}
    with atomic_dir(out_dir) as tmp:
        critic_set.save(tmp)
        write_json(tmp / "metrics.json", result)
    return result
