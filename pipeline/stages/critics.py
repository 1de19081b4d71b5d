"""The critics and refit stages: value, PRM and ORM heads trained on one iteration's search trees.

Features come from one frozen backbone, computed once per distinct text; the heads train on
them in milliseconds. By default the heads are fitted once, by the refit stage after train, on
the new policy's features (the policy they will serve); the critics stage, before train, fits
them on policy_i's only when no refit follows (critics.refit=false, or critics.backbone names
another model, which both stages would read alike). Value and PRM read what
critics.state_features names, the ORM what critics.orm_features names. Problems are split into
train and held-out, so the held-out metrics judge the heads on problems they were not fitted
on; the policy itself was DPO-trained on every training problem's trees, held-out ones too
(benchmarks/critics.py measures the critics on fresh test samples).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from critics import (
    KINDS,
    CriticSet,
    Example,
    ScalarHead,
    critic_examples,
    split_by_problem,
    train_head,
)
from critics.critic_set import FeatureSet, backbone_of, linear_features, pick
from critics.features import backbone_features
from critics.metrics import (
    accuracy,
    auc,
    expected_calibration_error,
    mse,
    precision_recall,
    within_problem_auc,
)
from critics.targets import cap_state_examples, heldout_problems
from pipeline.config import CriticsConfig, ModelConfig, QstarConfig, to_dict
from pipeline.errors import QstarError
from pipeline.lm.models import load_model, resolve_model_path
from pipeline.lm.trunk import Trunk
from pipeline.run.atomic import atomic_dir, write_json
from pipeline.run.store import load_shards
from pipeline.stages.base import Loop, resolve_ref
from pipeline.stages.reference import dpo_reference, implicit_critic, implicit_policy, trained_trunk

LOSS = {"value": "mse", "prm": "bce", "orm": "bce"}  # value regresses Q; PRM/ORM are probabilities


def load_critic_set(critics_dir: str | Path, policy_dir: str, model, tokenizer,
                    model_cfg: ModelConfig, batch_size: int) -> CriticSet:
    """critics_i for scoring. Heads only fit the backbone they were trained on: they share the
    loaded policy's weights when that is their backbone (the refit stage's heads); otherwise
    (critics.backbone, or critics-stage heads of policy_i used beside policy_{i+1} when no refit
    ran) the backbone is loaded.
    A backbone recorded by model name is resolved on this node."""
    backbone = resolve_model_path(replace(model_cfg, name=backbone_of(critics_dir)))
    if Path(backbone).resolve() != Path(policy_dir).resolve():
        model, tokenizer = load_model(replace(model_cfg, name=backbone))
    try:
        return CriticSet.load(critics_dir, model, tokenizer, batch_size)
    except ValueError as exc:  # heads fitted for other features: one line, which ones
        raise QstarError(f"{critics_dir}: {exc}") from None


def load_critics(critics_dir: Path | None, policy_dir: str, model, tokenizer,
                 cfg: QstarConfig) -> CriticSet | None:
    """critics_i for scoring (None before any exist); they share the policy's weights when their
    backbone is the policy."""
    if critics_dir is None:
        return None
    return load_critic_set(critics_dir, policy_dir=policy_dir, model=model, tokenizer=tokenizer,
                           model_cfg=cfg.model, batch_size=cfg.critics.score_batch_size)


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


def _rows_of(features: torch.Tensor, index: dict[tuple[str, str], int], examples: Sequence[Example]):
    return features[torch.tensor([index[e.prompt, e.completion] for e in examples], dtype=torch.long)]


def head_features(cfg: CriticsConfig) -> dict[str, str]:
    return {"value": cfg.state_features, "prm": cfg.state_features, "orm": cfg.orm_features}


def fit_and_judge(kind: str, train: list[Example], heldout: list[Example], features: torch.Tensor,
                  index: dict[tuple[str, str], int], cfg: CriticsConfig,
                  linear: int = 0) -> tuple[ScalarHead, dict]:
    """One head trained on `train`, with its training losses and held-out metrics; `linear`:
    trailing feature columns the head takes linearly (ScalarHead)."""
    head, losses = train_head(_rows_of(features, index, train), [e.target for e in train],
                              LOSS[kind], cfg.learning_rate, cfg.epochs, cfg.batch_size, cfg.seed,
                              linear)
    scores = head.predict(_rows_of(features, index, heldout)).numpy()
    return head, {"train_examples": len(train), "heldout_examples": len(heldout),
                  "trained": bool(train), "loss": LOSS[kind],
                  "train_loss_first": losses[0] if losses else None,
                  "train_loss_last": losses[-1] if losses else None,
                  **heldout_metrics(scores, [e.target for e in heldout])}


def within_problem(scores, heldout: Sequence[Example]) -> dict:
    """Within-problem AUC of scores on held-out completions, with why it is missing if it is."""
    found, problems = within_problem_auc(scores, [e.target for e in heldout],
                                         [e.problem_id for e in heldout])
    out = {"within_problem_auc": found, "within_problem_problems": problems}
    if found is None:
        out["within_problem_skipped"] = "no held-out problem has right and wrong completions"
    return out


def implicit_metrics(heldout: Sequence[Example], reference: tuple[str, float] | None, policy,
                     tokenizer, policy_dir: str, backbone: str, model_cfg: ModelConfig,
                     batch_size: int, trunk: Trunk | None = None) -> dict:
    """The policy's implicit reward (summed over each held-out completion) as a critic of it;
    its passes start above the `trunk` the features pass recorded, where the models share it."""
    if reference is None:
        return {"skipped": "the policy was not trained by DPO: no reference"}
    dpo_phase = implicit_policy(policy_dir)
    if dpo_phase is None and Path(backbone).resolve() != Path(policy_dir).resolve():
        policy, tokenizer = load_model(replace(model_cfg, name=policy_dir))
    critic = implicit_critic(reference, policy, tokenizer, model_cfg, batch_size,
                             f"{policy_dir}/meta.json", dpo_phase, trunk)
    rewards = critic.of_texts([e.prompt for e in heldout], [e.completion for e in heldout])
    targets = [e.target for e in heldout]
    return {"beta": reference[1], "heldout_examples": len(heldout),
            "auc": auc(rewards, targets), **within_problem(rewards, heldout)}


def _state_features(model, tokenizer, states: list[tuple[str, str]], cfg: CriticsConfig,
                    uses: dict, trunk: Trunk | None):
    """backbone_features of every (prompt, completion), recording the trunk where there is one."""
    with trunk.recording(model) if trunk else nullcontext():
        return backbone_features(model, tokenizer, [p for p, _ in states], [c for _, c in states],
                                 cfg.score_batch_size, cfg.max_length,
                                 logprobs=FeatureSet.confidence in uses.values(), tap=trunk)


def train_critics(rows: Sequence[dict], policy_dir: str, cfg: CriticsConfig, out_dir: Path,
                  model=None, tokenizer=None, model_cfg: ModelConfig | None = None,
                  record_backbone: str | None = None,
                  reference: tuple[str, float] | None = None) -> dict:
    """Train the three heads on the trees in `rows`, write `out_dir/{value,prm,orm}/`
    (head.safetensors + meta.json) and `out_dir/metrics.json` in one atomic rename, and return
    the metrics: per kind, example counts, train losses and held-out metrics.

    model/tokenizer: the backbone, if already loaded (it must be cfg.backbone or the policy).
    model_cfg: dtype/device to load the backbone with otherwise (default: CPU float32).
    record_backbone: how meta.json names the backbone (default: its path), e.g. relative to
    out_dir so that a moved run still finds it. reference: the policy's DPO (reference, beta),
    to judge its implicit reward beside the heads.
    """
    start = time.perf_counter()
    backbone = str(cfg.backbone or policy_dir)
    recorded = record_backbone or backbone
    if model is None:
        model, tokenizer = load_model(replace(model_cfg or ModelConfig(), name=backbone))
    examples = cap_state_examples(critic_examples(rows), cfg.max_state_texts, cfg.seed)
    problem_ids = sorted({str(row["problem_id"]) for row in rows})
    # value and PRM share most texts: one backbone pass per distinct (prompt, completion)
    states = sorted({(e.prompt, e.completion) for kind in KINDS for e in examples[kind]})
    uses = head_features(cfg)
    feature_start = time.perf_counter()
    # the layers below LoRA's, which the reference and DPO phase share: kept for the implicit pass
    trunk = (trained_trunk(policy_dir, model.config.num_hidden_layers)
             if reference and not cfg.backbone else None)
    found = _state_features(model, tokenizer, states, cfg, uses, trunk)
    feature_seconds = time.perf_counter() - feature_start
    index = {state: i for i, state in enumerate(states)}
    heads, meta, metrics = {}, {}, {}
    splits = {kind: split_by_problem(examples[kind], cfg.heldout_fraction, cfg.seed, problem_ids)
              for kind in KINDS}
    completions = splits["orm"][1]  # held-out right and wrong completions: within-problem AUC
    for kind in KINDS:
        train, heldout = splits[kind]
        heads[kind], metrics[kind] = fit_and_judge(
            kind, train, heldout, pick(found, uses[kind]), index, cfg,
            linear_features(uses[kind], model.config.hidden_size))
        metrics[kind]["features"] = uses[kind].value
        metrics[kind].update(within_problem(heads[kind].predict(
            _rows_of(pick(found, uses[kind]), index, completions)).numpy(), completions))
        meta[kind] = {"backbone": recorded, "examples": {"train": len(train), "heldout": len(heldout)},
                      "metrics": metrics[kind], "config": to_dict(cfg)}
    metrics["implicit"] = implicit_metrics(completions, reference, model, tokenizer, policy_dir,
                                           backbone, model_cfg or ModelConfig(), cfg.score_batch_size,
                                           trunk)
    result = {**metrics, "backbone": recorded, "problems": len(problem_ids),
              "heldout_problems": sorted(heldout_problems(problem_ids, cfg.heldout_fraction, cfg.seed)),
              "texts": len(states),
              "seconds": {"features": round(feature_seconds, 3),
                          "total": round(time.perf_counter() - start, 3)},
              "features_per_s": round(len(states) / feature_seconds, 1) if states else None}
    with atomic_dir(out_dir) as tmp:
        CriticSet(model, tokenizer, heads, cfg.max_length, cfg.score_batch_size, meta,
                  uses).save(tmp)
        write_json(tmp / "metrics.json", result)
    return result


def fit_critics(root: Path, out: Path, policy: str, rows: Sequence[dict], cfg: CriticsConfig,
                model_cfg: ModelConfig, record_backbone: str) -> dict:
    """The critics or refit stage's work, where it runs (pipeline.stages.base.stage_work)."""
    policy_dir = resolve_ref(root, policy, model_cfg)
    return train_critics(rows, policy_dir, cfg, out, model_cfg=model_cfg,
                         record_backbone=record_backbone, reference=dpo_reference(policy_dir))


def fit_stage(loop: Loop, i: int, stage: str, policy_index: int) -> dict:
    """Heads fitted on iteration i's trees on policy_{policy_index}'s features (or
    critics.backbone's), written to iter_i/<stage>; the policy's implicit reward judged beside."""
    rows = load_shards(loop.store.stage_dir(i, "search"))
    policy = loop.policy_ref(policy_index)
    backbone = loop.cfg.critics.backbone or policy  # recorded relative to it: the run can move
    if loop.store.in_run(backbone):
        backbone = os.path.relpath(loop.store.root / backbone, loop.store.stage_dir(i, stage))
    reference = dpo_reference(loop.policy(policy_index))  # shipped too: the implicit reward's pi_ref
    files = loop.run_files([policy, loop.store.relative(reference[0]) if reference else None],
                           implicit=policy)  # its DPO phase too, when the policy keeps one
    return loop.run_remote(fit_critics, i, stage, files, policy, rows, loop.cfg.critics,
                           loop.cfg.model, backbone)


def refits(cfg: CriticsConfig) -> bool:
    """Whether the refit stage fits critics_{i+1} (on policy_{i+1}'s features): then heads
    fitted on policy_i's would serve nothing, and the critics stage leaves them to it."""
    return cfg.enabled and cfg.refit and not cfg.backbone


def run(loop: Loop, i: int) -> dict:
    """Heads fitted on iteration i's trees, on policy_i's features: critics_{i+1} when no refit
    stage fits them on policy_{i+1}'s (critics.refit=false, or a critics.backbone)."""
    if not loop.cfg.critics.enabled:
        return {"skipped": "critics.enabled=false"}
    if refits(loop.cfg.critics):
        return {"skipped": f"the refit stage fits the heads once, on policy_{i + 1}'s features "
                           f"(critics.refit=false fits them here, on policy_{i}'s)"}
    return fit_stage(loop, i, "critics", i)


def refit_skipped(loop: Loop, i: int) -> str | None:
    """Why iteration i's refit stage has nothing to do (None: it fits critics_{i+1})."""
    cfg, store = loop.cfg.critics, loop.store
    if not cfg.enabled:
        return "critics.enabled=false"
    if not cfg.refit:
        return f"critics.refit=false: the heads stay fitted on policy_{i}"
    if cfg.backbone:
        return f"critics.backbone={cfg.backbone}: the heads do not read the policy"
    if store.done(i, "eval"):  # a run from before this stage: keep what its eval used
        return "the run predates the refit stage: its eval used the critics stage's heads"
    return None


def refit(loop: Loop, i: int) -> dict:
    """critics_{i+1}: heads fitted on iteration i's trees on the trained policy_{i+1}'s features
    (policy_i's when nothing was trained), so they judge the policy they were fitted to and
    share its weights."""
    why = refit_skipped(loop, i)
    if why:
        return {"skipped": why}
    return fit_stage(loop, i, "refit", i + 1)
