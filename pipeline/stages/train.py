"""Train stage: TRL DPO and/or SFT on the data stage's rows -> the next iteration's policy.

`train_policy` fine-tunes policy_i on `data_dir/{dpo,sft}.jsonl` (pipeline.stages.data) into
`out_dir/policy`; TRL trains, this module builds its configs and datasets. `train.history` adds
earlier iterations' rows (oldest first, as written), `train.from_base` starts from policy_0:
STaR's and ReST-EM's recipe (history=-1, from_base=true) refits the base model on everything
verified so far, never further than one fine-tune from the base.

- DPO: `trl.DPOTrainer` with TrainConfig's beta, loss_type (a list: mixed with equal weights,
  e.g. `[sigmoid,sft]`), step, epochs, batches and max_length. Reference = the starting policy
  with `precompute_ref_log_probs=True`: one no-grad pass of the *untrained* model (with LoRA:
  the adapter off) stores the reference log-probs as dataset columns before training, so no
  second model is held during training.
  `train.reference=base`: policy_0 is the reference in every iteration (pipeline.stages.reference).
  `train.reference=sft` (train.mode=dpo): SFT first, then DPO from and against its model, kept
  inside the policy (`sft_phase/`, meta.json's `reference`). No SFT rows: DPO against policy_i.
- EOS: TRL appends EOS to every DPO completion; a thin collator (TRL's, wrapped) removes it
  from a step option that is not terminal in the tree (it does not end the solution), for the
  reference pass and training alike. SFT rows are whole solutions: TRL's EOS stays.
- SFT: `trl.SFTTrainer` on prompt/completion rows, loss on the completion only (TRL's default).
  Both phases project the vocabulary at labelled positions only (`lm_head_on_labels_only`).
- mode: dpo | sft | dpo_then_sft (DPO from policy_i, then SFT from the DPO result). A phase with
  no rows is skipped; with none, nothing is trained or written: the result says `skipped` and
  names the old policy in `policy_dir`.
- Precision: float32 weights; bf16 (fp16) autocast on cuda with model.dtype bfloat16 (float16),
  on CPU only with train.cpu_autocast and model.dtype bfloat16 (benchmarks/RESULTS.md); the pair
  metrics after training run under TRL's autocast too. Activation checkpointing unless off.
- LoRA (cfg.lora): peft lazily; r=16, alpha=32, all linear layers (of the last
  cfg.lora_layer_fraction of layers), merged before saving: the next policy is a plain checkpoint.
  DPO's steps start at the first adapted layer, from what the reference pass computed below it
  (pipeline.lm.trunk).
- Checkpoints: TRL's output_dir is `out_dir/trainer/<phase>`, saved every `save_steps` steps and
  at the end, keeping one. If a checkpoint is there, the phase resumes from it
  (`resume_from_checkpoint`), so an interrupted training loses only the steps since it. A
  resumed DPO phase redoes the reference pass on the starting policy first (the weights of the
  checkpoint are loaded after it); a phase that had finished resumes at its last step and trains
  no more (dpo_then_sft killed during SFT keeps its DPO result).
- Final: model + tokenizer + meta.json written into a temporary directory and renamed onto
  `out_dir/policy` (atomic). meta.json: source_policy, reference, iteration, data_dir and
  earlier_data (run-relative in a run), rows {dpo, sft}, metrics, config (TrainConfig), model
  (ModelConfig), and implicit_policy when SFT trained on after DPO: the DPO phase's own model,
  kept in `out_dir/policy/dpo_phase` (saved when the DPO phase ends, moved in with the policy),
  whose log-ratio against the reference is the policy's implicit reward (pipeline.stages.reference).
  If `out_dir/policy/meta.json` exists, training is complete and its metrics are returned.
  Checkpoints are deleted afterwards unless keep_checkpoints; each phase's TRL log history stays
  in `out_dir/trainer/<phase>/log_history.json` (and, current while the phase runs, `log.jsonl`).
- Output: a bar per phase and a summary line (pipeline.run.train_progress); progress=false: the line.

Metrics (flat dict; `<phase>` is dpo or sft):
    mode, phases, policy_dir, source_policy, reference (None without a DPO phase), iteration,
    pairs (DPO rows in the files), sft_rows, data_iterations, steps, seconds, loss (last logged
    loss of the last phase), skipped (only when nothing trained),
    <phase>/rows (rows trained on), <phase>/rows_too_long (prompt alone >= max_length tokens:
    dropped, as TRL would), <phase>/steps, <phase>/seconds (reference pass included),
    <phase>/loss_first, <phase>/loss_last, <phase>/loss_mean, <phase>/train_loss,
    dpo/rewards/{chosen,rejected,margins,accuracies} (last logged step) and their _mean,
    dpo/logps/{chosen,rejected}_{first,last} (per-step batch means: each step sees other pairs,
    so first and last are not one pair's change), dpo/after/{rewards/chosen,rewards/rejected,
    rewards/margins,rewards/accuracies,logps/chosen,logps/rejected} (means over every pair with
    the trained policy: `pair_metrics_after`), dpo/logps/chosen_change (dpo/after/rewards/chosen
    / beta: the chosen log-prob against the reference, mean over all pairs; the r -> Q* paper
    predicts it falls during DPO), <phase>/mean_token_accuracy (last step) and its _mean.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig, Reference, TrainConfig, TrainMode, to_dict
from pipeline.lm.models import load_tokenizer
from pipeline.lm.trunk import replaying
from pipeline.run.atomic import atomic_dir, read_jsonl, write_json
from pipeline.run.memory import release_freed_memory
from pipeline.run.progress import weight_bars_off
from pipeline.run.train_progress import show_progress
from pipeline.stages.base import Loop, resolve_ref
from pipeline.stages.reference import (
    DPO_PHASE,
    SFT_PHASE,
    keep_phase,
    reference_dir,
    training_reference,
)
from pipeline.stages.trl_trainers import (
    DPO_KEYS,
    dpo_trainer,
    dpo_trunk,
    lm_head_on_labels_only,
    load_policy_for_training,
    pair_metrics_after,
    quiet_unless,
    sft_trainer,
)

FIRST_LAST_KEYS = ("loss", "logps/chosen", "logps/rejected")

_PHASES = {TrainMode.dpo: ["dpo"], TrainMode.sft: ["sft"], TrainMode.dpo_then_sft: ["dpo", "sft"]}
SFT_REFERENCE = ["sft", "dpo"]  # train.reference=sft: DPO from and against the SFT phase's model


def phases_of(cfg: TrainConfig) -> list[str]:
    """The training phases in order (those with rows run)."""
    return SFT_REFERENCE if cfg.reference == Reference.sft else _PHASES[TrainMode(cfg.mode)]


def _free_memory() -> None:
    import torch

    release_freed_memory()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _read_rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _rows_of(dirs: list[Path]) -> dict[str, list[dict]]:
    """The DPO and SFT rows of the data dirs, in their order."""
    return {p: [r for d in dirs for r in _read_rows(d / f"{p}.jsonl")] for p in ("dpo", "sft")}


def _iteration_of(rows: list[dict]) -> int | None:
    found = {r.get("lineage", {}).get("iteration") for r in rows} - {None}
    return found.pop() if len(found) == 1 else None


def _phase_metrics(phase: str, history: list[dict], steps: int, seconds: float, rows: int) -> dict:
    logs = [h for h in history if "loss" in h and "train_runtime" not in h]
    out: dict[str, Any] = {f"{phase}/steps": steps, f"{phase}/seconds": round(seconds, 3),
                           f"{phase}/rows": rows}
    for key in FIRST_LAST_KEYS:
        values = [h[key] for h in logs if key in h]
        if values:
            out[f"{phase}/{key}_first"] = values[0]
            out[f"{phase}/{key}_last"] = values[-1]
            if key == "loss":
                out[f"{phase}/loss_mean"] = sum(values) / len(values)
    for key in (*DPO_KEYS, "mean_token_accuracy"):
        values = [h[key] for h in logs if key in h]
        if values:
            out[f"{phase}/{key}"] = values[-1]
            out[f"{phase}/{key}_mean"] = sum(values) / len(values)
    summary = [h for h in history if "train_loss" in h]
    if summary:
        out[f"{phase}/train_loss"] = summary[-1]["train_loss"]
    return out


def _last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete TRL checkpoint. TRL writes a checkpoint in place and its
    trainer_state.json last, so a folder without one was cut short by a kill: skip it."""
    if not output_dir.is_dir():
        return None
    complete = [p for p in output_dir.glob("checkpoint-*")
                if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    if not complete:
        return None
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1])))


def train_policy(policy_dir: str | Path, data_dir: str | Path, cfg: TrainConfig,
                 out_dir: str | Path, report_to: str = "none", *,
                 model_cfg: ModelConfig | None = None, iteration: int | None = None,
                 save_steps: int = 10, keep_checkpoints: bool = False,
                 callbacks: list | None = None, progress: bool = False,
                 reference_dir: str | None = None, reference_record: str | None = None,
                 earlier_data: Sequence[str | Path] = (),
                 data_names: Sequence[str] | None = None) -> dict:
    """Fine-tune the policy at `policy_dir` on data_dir/{dpo,sft}.jsonl (after the rows of
    `earlier_data`, older iterations' data dirs: train.history); returns the metrics.

    The next policy is metrics["policy_dir"]: out_dir/policy, or `policy_dir` when there was
    nothing to train on (metrics["skipped"] says why). data_names: what meta.json calls
    earlier_data + [data_dir] (the loop: run-relative; default: the paths). model_cfg: device,
    dtype and trust_remote_code (not its name: the weights come from policy_dir). callbacks: extra
    TrainerCallbacks for every phase. progress=False: no library bars or per-step log prints.
    """
    from transformers import set_seed  # heavy: loaded when a stage trains

    policy_dir, data_dir, out_dir = str(policy_dir), Path(data_dir), Path(out_dir)
    model_cfg = model_cfg or ModelConfig(name=policy_dir)
    final = out_dir / "policy"
    if (final / "meta.json").is_file():  # finished before: the rename is the commit point
        return json.loads((final / "meta.json").read_text())["metrics"]

    dirs = [Path(d) for d in earlier_data] + [data_dir]
    rows = _rows_of(dirs)
    if iteration is None:
        iteration = _iteration_of(rows["dpo"] + rows["sft"])
    metrics: dict[str, Any] = {"mode": TrainMode(cfg.mode).value, "source_policy": policy_dir,
                               "iteration": iteration, "pairs": len(rows["dpo"]),
                               "sft_rows": len(rows["sft"]), "data_iterations": len(dirs)}
    wanted = [p for p in phases_of(cfg) if rows[p]]
    tokenizer = load_tokenizer(model_cfg, policy_dir) if wanted else None
    phases = _drop_long_prompts(rows, wanted, tokenizer, cfg.max_length, metrics)
    if not phases:
        reason = _nothing_to_train(phases_of(cfg), data_dir, cfg.max_length, metrics)
        return {**metrics, "skipped": reason, "policy_dir": policy_dir, "steps": 0, "seconds": 0.0}

    set_seed(cfg.seed)
    model = load_policy_for_training(policy_dir, cfg, model_cfg)
    use_cache = getattr(model.config, "use_cache", None)
    reference_dir, metrics["reference"] = _reference(phases, reference_dir or policy_dir,
                                                     reference_record)
    ref_model = reference_dir and training_reference(reference_dir, policy_dir, cfg, model_cfg)
    start = time.perf_counter()
    model, trainer, histories = _train_phases(
        model, tokenizer, rows, phases, metrics, cfg=cfg, model_cfg=model_cfg, out_dir=out_dir,
        report_to=report_to, save_steps=save_steps, callbacks=callbacks, progress=progress,
        ref_model=ref_model, use_cache=use_cache)
    metrics.update(steps=sum(metrics[f"{p}/steps"] for p in phases), policy_dir=str(final),
                   seconds=round(time.perf_counter() - start, 3),
                   loss=metrics.get(f"{phases[-1]}/loss_last"))
    if use_cache is not None:
        model.config.use_cache = use_cache  # as loaded: training may have switched it off
    meta = _meta(policy_dir, data_names or [str(d) for d in dirs], metrics, cfg, model_cfg)
    _save_policy(final, model, tokenizer, trainer, cfg.lora, meta, out_dir, phases)
    _keep_logs(out_dir, histories, keep_checkpoints)
    return metrics


def _meta(policy_dir: str, data_names: Sequence[str], metrics: dict, cfg: TrainConfig,
          model_cfg: ModelConfig) -> dict:
    """The policy's meta.json; data_names: earlier_data + [data_dir], as the run names them."""
    *earlier, data = data_names
    return {"source_policy": policy_dir, "reference": metrics["reference"],
            "iteration": metrics["iteration"], "data_dir": data, "earlier_data": list(earlier),
            "rows": {"dpo": metrics["pairs"], "sft": metrics["sft_rows"]}, "metrics": metrics,
            "config": to_dict(cfg), "model": to_dict(model_cfg)}


def _reference(phases: list[str], reference_dir: str,
               record: str | None) -> tuple[str | None, str | None]:
    """DPO's reference model to load (None: TRL's reference pass runs the model DPO starts from)
    and what meta.json records; (None, None) without a DPO phase. After an SFT phase
    (train.reference=sft) it is that phase's model, recorded beside the policy."""
    if "dpo" not in phases:
        return None, None
    if phases == SFT_REFERENCE:
        return None, SFT_PHASE
    return reference_dir, record or reference_dir


def _drop_long_prompts(rows: dict, wanted: list[str], tokenizer, max_length: int,
                       metrics: dict) -> list[str]:
    """Drop rows whose prompt leaves no room for a completion (TRL would drop them silently);
    the phases that still have rows."""
    phases = []
    for phase in wanted:
        fitting = [r for r in rows[phase] if len(tokenizer(r["prompt"])["input_ids"]) < max_length]
        metrics[f"{phase}/rows_too_long"] = len(rows[phase]) - len(fitting)
        rows[phase] = fitting
        if fitting:
            phases.append(phase)
    metrics["phases"] = phases
    return phases


def _nothing_to_train(phases: list[str], data_dir: Path, max_length: int, metrics: dict) -> str:
    names = {"dpo": "DPO pairs", "sft": "SFT rows"}
    what = " or ".join(names[p] for p in phases)
    too_long = sum(metrics.get(f"{p}/rows_too_long", 0) for p in phases)
    if too_long:
        return (f"every one of the {too_long} {what} has a prompt of "
                f"train.max_length={max_length} tokens or more")
    return f"no {what} in {data_dir}"


def _train_phases(model, tokenizer, rows: dict, phases: list[str], metrics: dict, *,
                  cfg: TrainConfig, model_cfg: ModelConfig, out_dir: Path, report_to: str,
                  save_steps: int, callbacks: list | None, progress: bool, ref_model=None,
                  use_cache: bool | None = None):
    """Each phase continues from the previous one's model; resumes from the newest complete
    checkpoint. A DPO phase that another follows leaves its model in out_dir/dpo_phase (the
    implicit reward's policy); an SFT phase DPO follows, in out_dir/sft_phase (its reference).
    Returns the trained model, the last trainer, the histories."""
    trunk = dpo_trunk(cfg, model, ref_model)  # recorded by DPO's reference pass, replayed by its steps
    runners = {"dpo": partial(dpo_trainer, ref_model=ref_model, trunk=trunk), "sft": sft_trainer}
    histories, trainer = {}, None
    for phase in phases:
        output_dir = out_dir / "trainer" / phase
        phase_start = time.perf_counter()
        trainer = None  # let the previous phase's optimizer state go before the next one
        _free_memory()
        with quiet_unless(progress), lm_head_on_labels_only():
            trainer = runners[phase](model, tokenizer, rows[phase], cfg, model_cfg, output_dir,
                                     report_to, save_steps, callbacks, progress)
            show_progress(trainer, phase, output_dir, progress)  # a bar and a summary line
            _free_memory()  # what TRL's reference pass (in the trainer's init) left behind
            with replaying(trainer.model, trunk if phase == "dpo" else None):
                trainer.train(resume_from_checkpoint=_last_checkpoint(output_dir))
        histories[phase] = trainer.state.log_history
        metrics.update(_phase_metrics(phase, trainer.state.log_history, trainer.state.global_step,
                                      time.perf_counter() - phase_start, len(trainer.train_dataset)))
        model = trainer.model
        if cfg.lora:
            model = model.merge_and_unload()  # the next phase, or the saved policy, is plain
        if phase == "dpo":
            metrics.update(pair_metrics_after(model, trainer, cfg.beta, trunk))
        if phase != phases[-1]:  # what a later phase's implicit reward needs of this one
            keep_phase(out_dir / (DPO_PHASE if phase == "dpo" else SFT_PHASE), model, tokenizer,
                       use_cache)
    return model, trainer, histories


def pair_metrics_of(policy_dir: str, data_dir: Path, cfg: TrainConfig, model_cfg: ModelConfig,
                    work_dir: Path) -> dict:
    """`pair_metrics_after` for a policy trained before the train stage measured it: the trained
    policy against the reference its meta.json records, over the DPO pairs of `data_dir`."""
    reference = reference_dir(policy_dir, model_cfg)
    if reference is None:
        return {}
    rows = {"dpo": _read_rows(Path(data_dir) / "dpo.jsonl")}
    tokenizer = load_tokenizer(model_cfg, policy_dir)
    if not _drop_long_prompts(rows, ["dpo"], tokenizer, cfg.max_length, {}):
        return {}
    cfg = replace(cfg, lora=False)  # the saved policy is plain: LoRA was merged before saving
    model = load_policy_for_training(policy_dir, cfg, model_cfg)
    ref_model = training_reference(reference, policy_dir, cfg, model_cfg)
    trainer = dpo_trainer(model, tokenizer, rows["dpo"], cfg, model_cfg, work_dir, "none", 10**9,
                          None, False, ref_model=ref_model)
    return pair_metrics_after(model, trainer, cfg.beta)


def _save_policy(final: Path, model, tokenizer, trainer, lora: bool, meta: dict,
                 out_dir: Path, phases: list[str]) -> None:
    """The next policy, its tokenizer and meta.json, in one atomic rename (the commit point);
    the DPO phase's model, when kept, moves in and meta names it (a run killed after the move
    redoes the finished DPO phase from its checkpoint, which keeps it again)."""
    with atomic_dir(final) as tmp, weight_bars_off():
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        if lora:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            trainer.save_model(str(tmp))  # model + tokenizer (processing_class)
        for leftover in ("training_args.bin", "README.md"):
            (tmp / leftover).unlink(missing_ok=True)
        if "dpo" in phases[:-1]:  # a DPO phase another followed (not one a failed run left)
            os.replace(out_dir / DPO_PHASE, tmp / DPO_PHASE)
            meta = {**meta, "implicit_policy": DPO_PHASE}
        if phases == SFT_REFERENCE:  # meta's reference names it
            os.replace(out_dir / SFT_PHASE, tmp / SFT_PHASE)
        write_json(tmp / "meta.json", meta)


def _keep_logs(out_dir: Path, histories: dict, keep_checkpoints: bool) -> None:
    for phase, history in histories.items():
        phase_dir = out_dir / "trainer" / phase
        write_json(phase_dir / "log_history.json", history)
        if not keep_checkpoints:
            for ckpt in phase_dir.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)


def fit_policy(root: Path, out: Path, policy: str, data: str, cfg: TrainConfig,
               model_cfg: ModelConfig, iteration: int, report_to: str, reference: str,
               reference_record: str, progress: bool, earlier: list[str]) -> dict:  # stage_work
    metrics = train_policy(resolve_ref(root, policy, model_cfg), root / data, cfg, out,
                           report_to, model_cfg=model_cfg, iteration=iteration, progress=progress,
                           reference_dir=resolve_ref(root, reference, model_cfg),
                           reference_record=reference_record,
                           earlier_data=[root / d for d in earlier], data_names=[*earlier, data])
    if "skipped" in metrics:  # names the data dir: as the run knows it, not this worker
        metrics["skipped"] = metrics["skipped"].replace(str(root / data), data)
    return metrics


def data_refs(loop: Loop, i: int) -> list[str]:
    """The data stages iteration i trains on (train.history), run-relative, oldest first."""
    first = 0 if loop.cfg.train.history == -1 else max(0, i - loop.cfg.train.history + 1)
    return [loop.store.relative(loop.store.stage_dir(j, "data")) for j in range(first, i + 1)]


def run(loop: Loop, i: int) -> dict:
    """policy_{i+1} from policy_i (policy_0 with train.from_base) and the rows of
    train.history's iterations; recorded run-relative (or by name). The DPO reference
    (train.reference) is recorded relative to the new policy, or by name. Nothing to train on:
    policy_i stays."""
    policy = loop.policy_ref(0 if loop.cfg.train.from_base else i)
    *earlier, data = data_refs(loop, i)
    reference = loop.policy_ref(0) if loop.cfg.train.reference == Reference.base else policy
    trained = loop.store.relative(loop.store.stage_dir(i, "train") / "policy")
    record = os.path.relpath(reference, trained) if loop.store.in_run(reference) else reference
    metrics = loop.run_remote(fit_policy, i, "train",
                              loop.run_files([policy, *earlier, data, reference]), policy, data,
                              loop.cfg.train, loop.cfg.model, i,
                              loop.tracker.report_to if loop.cluster.ray is None else "none",
                              reference, record, loop.cfg.progress, earlier)
    return {**metrics, "source_policy": policy,
            "policy_dir": loop.policy_ref(i) if "skipped" in metrics else trained}
