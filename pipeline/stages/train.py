"""Train stage: TRL DPO and/or SFT on the data stage's rows -> the next iteration's policy.

`train_policy` fine-tunes policy_i on `data_dir/{dpo,sft}.jsonl` (see pipeline.stages.data for the
row formats) and saves policy_{i+1} into `out_dir/policy`. TRL does the training; this module
only builds its configs and datasets:

- DPO: `trl.DPOTrainer` with beta, loss_type (comma-separated for a weighted-equal mix, e.g.
  "sigmoid,sft"), learning rate, epochs, batch size, gradient accumulation and max_length from
  TrainConfig. Reference = the starting policy with `precompute_ref_log_probs=True`: TRL runs one
  no-grad pass of the *untrained* model over the pairs before training, stores the reference
  log-probs as dataset columns and sets `ref_model=None`, so no second model is held during
  training. (With LoRA the reference is the base model with the adapter disabled.)
- EOS: TRL appends the tokenizer's EOS to every DPO completion. A step option that is not
  terminal in the tree does not end the solution, so a thin collator (TRL's own
  `DataCollatorForPreference`, wrapped) removes that EOS token from non-terminal completions,
  for the reference pass and for training alike. SFT rows are whole solutions: TRL's EOS stays.
- SFT: `trl.SFTTrainer` on prompt/completion rows, loss on the completion only (TRL's default
  for that format).
- mode: dpo | sft | dpo_then_sft (DPO from policy_i, then SFT from the DPO result). A phase with
  no rows is skipped; when no phase has rows nothing is trained or written and the result says
  `skipped` and names the old policy in `policy_dir`, for the caller to reuse.
- Precision: float32 weights; bf16 (or fp16) autocast only when model_cfg.device is cuda and
  model_cfg.dtype is bfloat16 (float16). On CPU `use_cpu=True`, `bf16=False`. Gradient
  checkpointing (a TRL default) only on cuda, where memory is the limit.
- LoRA (cfg.lora): peft imported lazily; r=16, alpha=32, all linear layers; the adapter is merged
  into the weights before saving, so the next policy is a plain checkpoint.
- Checkpoints: TRL's output_dir is `out_dir/trainer/<phase>`, saved every `save_steps` steps and
  at the end, keeping one. If a checkpoint is there, the phase resumes from it
  (`resume_from_checkpoint`), so an interrupted training loses only the steps since it. A
  resumed DPO phase redoes the reference pass on the starting policy first (the weights of the
  checkpoint are loaded after it); a phase that had finished resumes at its last step and trains
  no more (dpo_then_sft killed during SFT keeps its DPO result).
- Final: model + tokenizer + meta.json written into a temporary directory and renamed onto
  `out_dir/policy` (atomic). meta.json: source_policy, iteration, data_dir, rows {dpo, sft},
  metrics, config (TrainConfig), model (ModelConfig). If `out_dir/policy/meta.json` already exists, training is complete
  and its metrics are returned without training again. Checkpoints are deleted afterwards unless
  keep_checkpoints; each phase's TRL log history stays in `out_dir/trainer/<phase>/log_history.json`.

Metrics (flat dict; `<phase>` is dpo or sft):
    mode, phases, policy_dir, source_policy, iteration, pairs (DPO rows in the file), sft_rows,
    steps, seconds, loss (last logged loss of the last phase), skipped (only when nothing trained),
    <phase>/rows (rows trained on), <phase>/rows_too_long (prompt alone >= max_length tokens:
    dropped, as TRL would), <phase>/steps, <phase>/seconds (reference pass included),
    <phase>/loss_first, <phase>/loss_last, <phase>/loss_mean, <phase>/train_loss,
    dpo/rewards/{chosen,rejected,margins,accuracies} (last logged step) and their _mean,
    dpo/logps/chosen_first, dpo/logps/chosen_last, dpo/logps/rejected_first,
    dpo/logps/rejected_last (per-step batch means), dpo/logps/chosen_change
    (rewards/chosen / beta at the last step: the chosen log-prob against the reference; the r -> Q*
    paper predicts it falls during DPO), <phase>/mean_token_accuracy (last step) and its _mean.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig, TrainConfig, TrainMode, to_dict
from pipeline.errors import QstarError
from pipeline.lm.models import load_tokenizer
from pipeline.run.atomic import atomic_dir, read_jsonl, write_json
from pipeline.stages.base import Loop, resolve_ref

LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
FIRST_LAST_KEYS = ("loss", "logps/chosen", "logps/rejected")


@dataclass
class _EosAwareCollator:
    """TRL's preference collator, after removing the EOS TRL appended to a completion that is not
    the end of a solution (a non-terminal step option)."""

    inner: Any  # trl DataCollatorForPreference
    eos_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        batch = []
        for ex in examples:
            item = {k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids",
                                       "ref_chosen_logps", "ref_rejected_logps") if k in ex}
            for side in ("chosen", "rejected"):
                ids = list(item[f"{side}_ids"])
                if not ex[f"{side}_eos"] and len(ids) > 1 and ids[-1] == self.eos_token_id:
                    item[f"{side}_ids"] = ids[:-1]
            batch.append(item)
        return self.inner(batch)


def _quiet() -> bool:
    return os.environ.get("QSTAR_PROGRESS", "1") == "0"


@contextmanager
def _quiet_when_progress_off():
    """QSTAR_PROGRESS=0: no datasets/transformers/TRL progress bars and no per-step log prints
    (the metrics keep everything); the global switches are restored afterwards."""
    if not _quiet():
        yield
        return
    import datasets
    import transformers

    bars = datasets.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    tqdm_env = os.environ.get("TQDM_DISABLE")
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference log-prob pass reads it
    try:
        yield
    finally:
        if bars[0]:
            datasets.enable_progress_bars()
        if bars[1]:
            transformers.utils.logging.enable_progress_bar()
        if tqdm_env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_env


_PHASES = {TrainMode.dpo: ["dpo"], TrainMode.sft: ["sft"], TrainMode.dpo_then_sft: ["dpo", "sft"]}


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _read_rows(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _iteration_of(rows: list[dict]) -> int | None:
    found = {r.get("lineage", {}).get("iteration") for r in rows} - {None}
    return found.pop() if len(found) == 1 else None


def _lora_config(cfg: TrainConfig):
    try:
        import peft
    except ImportError as exc:
        raise QstarError("train.lora=true needs peft: pip install 'qstar[lora]'") from exc
    return peft.LoraConfig(task_type="CAUSAL_LM", **LORA)


def _common_args(cfg: TrainConfig, model_cfg: ModelConfig, output_dir: Path, report_to: str,
                 save_steps: int) -> dict:
    cuda = model_cfg.device.startswith("cuda")
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        max_length=cfg.max_length,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=cuda and model_cfg.dtype == "bfloat16",
        fp16=cuda and model_cfg.dtype == "float16",
        use_cpu=not cuda,
        activation_checkpointing=cuda,  # TRL defaults to on; the new name avoids a warning
        dataloader_pin_memory=cuda,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        report_to=report_to,
        disable_tqdm=_quiet(),
    )


def _load_model(path: str, cfg: TrainConfig, model_cfg: ModelConfig):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32
    if cfg.lora and model_cfg.device.startswith("cuda") and model_cfg.dtype != "float32":
        dtype = getattr(torch, model_cfg.dtype)  # frozen base in half precision, adapter in fp32
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                    trust_remote_code=model_cfg.trust_remote_code)
    except OSError as exc:
        raise QstarError(f"cannot load the policy at {path}: {str(exc).splitlines()[0]}") from exc


def _run_dpo(model, tokenizer, rows, cfg, model_cfg, output_dir, report_to, save_steps, callbacks):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    dataset = Dataset.from_list([{
        "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
        "chosen_eos": bool(r.get("lineage", {}).get("terminal", [True, True])[0]),
        "rejected_eos": bool(r.get("lineage", {}).get("terminal", [True, True])[1]),
    } for r in rows])
    args = DPOConfig(
        **_common_args(cfg, model_cfg, output_dir, report_to, save_steps),
        beta=cfg.beta,
        loss_type=[t.strip() for t in cfg.loss_type.split(",") if t.strip()],
        precompute_ref_log_probs=True,
        remove_unused_columns=False,  # the collator reads chosen_eos / rejected_eos
    )
    collator = _EosAwareCollator(
        DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=cfg.max_length,
                                  truncation_mode=args.truncation_mode),
        tokenizer.eos_token_id,
    )
    return DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      data_collator=collator, callbacks=callbacks,
                      peft_config=_lora_config(cfg) if cfg.lora else None)


def _run_sft(model, tokenizer, rows, cfg, model_cfg, output_dir, report_to, save_steps, callbacks):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                 for r in rows])
    args = SFTConfig(**_common_args(cfg, model_cfg, output_dir, report_to, save_steps),
                     packing=False)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=callbacks, peft_config=_lora_config(cfg) if cfg.lora else None)


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
                 callbacks: list | None = None) -> dict:
    """Fine-tune the policy at `policy_dir` on data_dir/{dpo,sft}.jsonl; returns the metrics.

    The next iteration's policy is metrics["policy_dir"]: out_dir/policy after training, or
    `policy_dir` itself when there was nothing to train on (metrics["skipped"] says why).
    model_cfg gives device, dtype and trust_remote_code (its name is ignored: the weights come
    from policy_dir). callbacks: extra transformers TrainerCallbacks for every phase.
    """
    from transformers import PrinterCallback, set_seed

    policy_dir, data_dir, out_dir = str(policy_dir), Path(data_dir), Path(out_dir)
    model_cfg = model_cfg or ModelConfig(name=policy_dir)
    final = out_dir / "policy"
    if (final / "meta.json").is_file():  # finished before: the rename is the commit point
        return json.loads((final / "meta.json").read_text())["metrics"]

    rows = {"dpo": _read_rows(data_dir / "dpo.jsonl"), "sft": _read_rows(data_dir / "sft.jsonl")}
    if iteration is None:
        iteration = _iteration_of(rows["dpo"] + rows["sft"])
    mode = TrainMode(cfg.mode)
    metrics: dict[str, Any] = {"mode": mode.value, "source_policy": policy_dir,
                               "iteration": iteration, "pairs": len(rows["dpo"]),
                               "sft_rows": len(rows["sft"])}
    wanted = [p for p in _PHASES[mode] if rows[p]]
    tokenizer = load_tokenizer(model_cfg, policy_dir) if wanted else None
    phases, too_long = [], {}
    for phase in wanted:
        fitting = [r for r in rows[phase]
                   if len(tokenizer(r["prompt"])["input_ids"]) < cfg.max_length]
        too_long[phase] = len(rows[phase]) - len(fitting)
        metrics[f"{phase}/rows_too_long"] = too_long[phase]  # TRL would drop them: no completion left
        rows[phase] = fitting
        if fitting:
            phases.append(phase)
    metrics["phases"] = phases
    if not phases:
        names = {"dpo": "DPO pairs", "sft": "SFT rows"}
        what = " or ".join(names[p] for p in _PHASES[mode])
        reason = f"no {what} in {data_dir}"
        if any(too_long.values()):
            reason = (f"every one of the {sum(too_long.values())} {what} has a prompt of "
                      f"train.max_length={cfg.max_length} tokens or more")
        return {**metrics, "skipped": reason, "policy_dir": policy_dir, "steps": 0, "seconds": 0.0}

    set_seed(cfg.seed)
    model = _load_model(policy_dir, cfg, model_cfg)
    use_cache = getattr(model.config, "use_cache", None)
    runners = {"dpo": _run_dpo, "sft": _run_sft}
    start = time.perf_counter()
    histories = {}
    trainer = None
    for phase in phases:
        output_dir = out_dir / "trainer" / phase
        phase_start = time.perf_counter()
        trainer = None  # let the previous phase's optimizer state go before the next one
        _free_memory()
        with _quiet_when_progress_off():
            trainer = runners[phase](model, tokenizer, rows[phase], cfg, model_cfg, output_dir,
                                     report_to, save_steps, callbacks)
            if _quiet():
                trainer.remove_callback(PrinterCallback)
            trainer.train(resume_from_checkpoint=_last_checkpoint(output_dir))
        seconds = time.perf_counter() - phase_start
        histories[phase] = trainer.state.log_history
        metrics.update(_phase_metrics(phase, trainer.state.log_history, trainer.state.global_step,
                                      seconds, len(trainer.train_dataset)))
        if phase == "dpo" and "dpo/rewards/chosen" in metrics:
            # rewards/chosen = beta * (log pi - log pi_ref) of the chosen completions: their
            # log-probability change against the reference at the last step (r -> Q*: it falls)
            metrics["dpo/logps/chosen_change"] = metrics["dpo/rewards/chosen"] / cfg.beta
        model = trainer.model
        if cfg.lora:
            model = model.merge_and_unload()  # the next phase, or the saved policy, is plain
    metrics["steps"] = sum(metrics[f"{p}/steps"] for p in phases)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    metrics["loss"] = metrics.get(f"{phases[-1]}/loss_last")
    metrics["policy_dir"] = str(final)

    meta = {
        "source_policy": policy_dir,
        "iteration": iteration,
        "data_dir": str(data_dir),
        "rows": {"dpo": metrics["pairs"], "sft": metrics["sft_rows"]},
        "metrics": metrics,
        "config": to_dict(cfg),
        "model": to_dict(model_cfg),
    }
    if use_cache is not None:
        model.config.use_cache = use_cache  # as loaded: training may have switched it off
    with atomic_dir(final) as tmp:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        if cfg.lora:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            trainer.save_model(str(tmp))  # model + tokenizer (processing_class)
        for leftover in ("training_args.bin", "README.md"):
            (tmp / leftover).unlink(missing_ok=True)
        write_json(tmp / "meta.json", meta)
    for phase, history in histories.items():
        phase_dir = out_dir / "trainer" / phase
        write_json(phase_dir / "log_history.json", history)
        if not keep_checkpoints:
            for ckpt in phase_dir.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
    return metrics


def fit_policy(root: Path, out: Path, policy: str, data: str, cfg: TrainConfig,
               model_cfg: ModelConfig, iteration: int, report_to: str) -> dict:  # see stage_work
    metrics = train_policy(resolve_ref(root, policy, model_cfg), root / data, cfg, out,
                           report_to, model_cfg=model_cfg, iteration=iteration)
    if "skipped" in metrics:  # names the data dir: as the run knows it, not this worker
        metrics["skipped"] = metrics["skipped"].replace(str(root / data), data)
    return metrics


def run(loop: Loop, i: int) -> dict:
    """policy_{i+1} from policy_i and iteration i's rows; recorded run-relative (or by name)."""
    policy, data = loop.policy_ref(i), loop.store.relative(loop.store.stage_dir(i, "data"))
    metrics = loop.run_remote(fit_policy, i, "train", [policy, data], policy, data,
                              loop.cfg.train, loop.cfg.model, i,
                              loop.tracker.report_to if loop.cluster.ray is None else "none")
    trained = loop.store.relative(loop.store.stage_dir(i, "train") / "policy")
    return {**metrics, "source_policy": policy,
            "policy_dir": policy if "skipped" in metrics else trained}
