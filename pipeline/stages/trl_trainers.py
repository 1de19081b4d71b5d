"""TRL trainers for the train stage: their configs, datasets, the EOS-aware DPO collator, and
the DPO pair metrics over every pair after training (`pair_metrics_after`).

TRL does the training; this module only builds `trl.DPOTrainer` / `trl.SFTTrainer` from
TrainConfig (see pipeline/stages/train.py for the whole stage and its metrics).
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.errors import QstarError
from pipeline.lm import trunk as trunk_lib
from pipeline.lm.models import cuda_attention
from pipeline.lm.teacher_forced import tail_logprobs
from pipeline.lm.trunk import Trunk, replaying_passes
from pipeline.run.progress import weight_bars_off
from pipeline.run.train_progress import library_bars_off

DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
AFTER_KEYS = (*DPO_KEYS, "logps/chosen", "logps/rejected")  # dpo/after/<key>: over all pairs
PAIR_METRICS_BATCH = 16  # completions per token tree in pair_metrics_after (8 pairs)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")


@dataclass
class EosAwareCollator:
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


@contextmanager
def quiet_unless(progress: bool):
    """No datasets/transformers bars inside a phase (TrainProgress shows one bar); with
    progress=False also none of TRL's (its reference log-prob pass); restored afterwards."""
    with library_bars_off():
        if progress:
            yield
            return
        tqdm_env = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # TRL's reference log-prob pass reads it
        try:
            yield
        finally:
            _restore_tqdm(tqdm_env)


def _restore_tqdm(tqdm_env: str | None) -> None:
    if tqdm_env is None:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = tqdm_env


@contextmanager
def lm_head_on_labels_only():
    """While it is open, TRL's fused LM head projects only the positions that have a label (the
    completion tokens) on a CPU too, not every position.

    TRL (`trl.trainer.utils.add_fused_lm_head`) scores only the labelled positions on Triton
    devices and every position elsewhere, so that compiled backends (Neuron) keep one tile shape.
    Eager CPU code has no tiles to keep, and here the prompt is most of every row (the demo's
    one-shot prompt is ~100 tokens, a step option ~6): on 24 of the demo's pairs, DPO's steps
    took 18-25% less time, its init (tokenization and reference pass) 14-37% less, and the
    process peaked 230-250 MB lower, with equal losses (benchmarks/RESULTS.md, "The LM
    head on labelled positions only"). TRL picks the path with its private `_use_triton`, which
    this swaps for the duration (and leaves alone when a TRL version no longer has it)."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if original is None:
        yield
        return
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


@contextmanager
def reference_pass_as_token_trees(pairs_per_forward: int, trunk: Trunk | None = None):
    """While it is open, the reference log-prob pass in TRL's DPOTrainer init (its
    `_precompute_ref_logps`, swapped for the duration) scores each pair's prompt once for both
    completions, as pair_metrics_after does: `reference_logps` on the token ids TRL's collator
    gives, `pairs_per_forward` pairs per token tree, the prefix all prompts open with (the task's
    instruction and worked example) run once. TRL's own pass runs every pair's prompt twice,
    right-padded: 104 against 78.5 s of the demo's DPO phase on a CPU (benchmarks/RESULTS.md,
    "Token trees for the reference pass and the refit"). The columns TRL's loss reads
    (ref_chosen_logps, ref_rejected_logps) are the same. With a `trunk` (pipeline.lm.trunk) the
    pass also records what enters its first adapted layer, for the training steps to start there.
    Leaves TRL's pass alone where a TRL version no longer has the method."""
    from trl import DPOTrainer

    original = getattr(DPOTrainer, "_precompute_ref_logps", None)
    if original is None:
        yield
        return

    def shared(trainer, dataset, name, batch_size):
        chosen, rejected = reference_logps(trainer, dataset, 2 * pairs_per_forward, trunk)
        return (dataset.add_column("ref_chosen_logps", chosen)
                .add_column("ref_rejected_logps", rejected))

    DPOTrainer._precompute_ref_logps = shared
    try:
        yield
    finally:
        DPOTrainer._precompute_ref_logps = original


def pair_token_ids(trainer, dataset) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids) of every pair's chosen then rejected completion, as TRL
    trains on them: from the trainer's own collator (EOS rule and truncation included)."""
    pairs = []
    for row in dataset:
        batch = trainer.data_collator([row])  # rows [chosen, rejected]
        for side in range(2):
            real = batch["attention_mask"][side].bool()
            completion = batch["completion_mask"][side].bool()
            pairs.append((batch["input_ids"][side][real & ~completion].tolist(),
                          batch["input_ids"][side][completion].tolist()))
    return pairs


def reference_logps(trainer, dataset, batch: int,
                    trunk: Trunk | None = None) -> tuple[list[float], list[float]]:
    """Each pair's summed reference log-probs (chosen, rejected), under the autocast of TRL's
    training: the trainer's ref_model, else its model (a peft model with its adapter off), whose
    frozen trunk `trunk` records then."""
    model = trainer.ref_model or trainer.model
    adapter_off = nullcontext()
    if trainer.ref_model is None and hasattr(model, "disable_adapter"):  # a peft model
        adapter_off, model = model.disable_adapter(), model.get_base_model()
    trunk = trunk if trainer.ref_model is None else None  # another model's trunk is not ours
    training = model.training
    model.eval()
    try:
        with adapter_off, trainer.accelerator.autocast(), \
                trunk.recording(model) if trunk else nullcontext():
            logps = [sum(tokens) for tokens in tail_logprobs(
                model, trainer.processing_class, pair_token_ids(trainer, dataset), batch, trunk)]
    finally:
        model.train(training)
    return logps[0::2], logps[1::2]


def adapted_layers(fraction: float, layers: int) -> range:
    """The decoder layers LoRA adapts: the last `fraction` of them, rounded, at least one."""
    return range(layers - max(1, round(fraction * layers)), layers)


def dpo_trunk(cfg: TrainConfig, model, ref_model) -> Trunk | None:
    """The trunk DPO's reference pass records and its steps replay (pipeline.lm.trunk): the
    layers below the first adapted one, when LoRA leaves some, the reference is the model DPO
    starts from, and no activation checkpointing recomputes the layers; else None."""
    if not (trunk_lib.SHARE_TRUNK and cfg.lora and ref_model is None and not cfg.activation_checkpointing):
        return None
    depth = adapted_layers(cfg.lora_layer_fraction, model.config.num_hidden_layers).start
    return Trunk(depth) if depth else None


def lora_config(cfg: TrainConfig, model):
    """The adapter peft trains (None without train.lora): every linear module of the last
    train.lora_layer_fraction of the decoder layers (of every layer by default)."""
    if not cfg.lora:
        return None
    try:
        import peft
    except ImportError as exc:
        raise QstarError("train.lora=true needs peft, a qstar dependency: pip install 'peft>=0.13'") from exc
    layers = model.config.num_hidden_layers
    adapted = adapted_layers(cfg.lora_layer_fraction, layers)
    if len(adapted) == layers:
        return peft.LoraConfig(task_type="CAUSAL_LM", **LORA)
    # peft takes a layer subset only with the modules named: every linear one but the LM head
    head = model.get_output_embeddings()
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if isinstance(module, torch.nn.Linear) and module is not head})
    return peft.LoraConfig(task_type="CAUSAL_LM", **{**LORA, "target_modules": linear},
                           layers_to_transform=list(adapted))


def common_args(cfg: TrainConfig, model_cfg: ModelConfig, output_dir: Path, report_to: str,
                 save_steps: int, progress: bool) -> dict:
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
        bf16=(cuda or cfg.cpu_autocast) and model_cfg.dtype == "bfloat16",
        fp16=cuda and model_cfg.dtype == "float16",
        use_cpu=not cuda,
        activation_checkpointing=cfg.activation_checkpointing,  # the new name avoids a warning
        dataloader_pin_memory=cuda,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=1,
        report_to=report_to,
        disable_tqdm=not progress,
    )


def load_policy_for_training(path: str, cfg: TrainConfig, model_cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    cuda_attention(model_cfg.device)
    dtype = torch.float32
    if cfg.lora and model_cfg.device.startswith("cuda") and model_cfg.dtype != "float32":
        dtype = getattr(torch, model_cfg.dtype)  # frozen base in half precision, adapter in fp32
    try:
        with weight_bars_off():
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as exc:
        raise QstarError(f"cannot load the policy at {path}: {str(exc).splitlines()[0]}") from exc


def dpo_trainer(model, tokenizer, rows, cfg, model_cfg, output_dir, report_to, save_steps, callbacks,
                progress, ref_model=None, trunk: Trunk | None = None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    dataset = Dataset.from_list([{
        "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
        "chosen_eos": bool(r.get("lineage", {}).get("terminal", [True, True])[0]),
        "rejected_eos": bool(r.get("lineage", {}).get("terminal", [True, True])[1]),
    } for r in rows])
    args = DPOConfig(
        **common_args(cfg, model_cfg, output_dir, report_to, save_steps, progress),
        beta=cfg.beta,
        loss_type=[loss.value for loss in cfg.loss_type],
        precompute_ref_log_probs=True,  # a pass in the init: reference_pass_as_token_trees
        remove_unused_columns=False,  # the collator reads chosen_eos / rejected_eos
    )
    collator = EosAwareCollator(
        DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=cfg.max_length,
                                  truncation_mode=args.truncation_mode),
        tokenizer.eos_token_id,
    )
    with reference_pass_as_token_trees(cfg.reference_batch_size, trunk):
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset,
                             processing_class=tokenizer, data_collator=collator,
                             callbacks=callbacks, peft_config=lora_config(cfg, model))
    trainer.ref_model = None  # its log-probs are dataset columns now (precomputed): free it
    return trainer


def sft_trainer(model, tokenizer, rows, cfg, model_cfg, output_dir, report_to, save_steps, callbacks,
             progress):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                 for r in rows])
    common = common_args(cfg, model_cfg, output_dir, report_to, save_steps, progress)
    if cfg.sft_learning_rate is not None:
        common["learning_rate"] = cfg.sft_learning_rate
    args = SFTConfig(**common, packing=False)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=callbacks, peft_config=lora_config(cfg, model))


def pair_metrics_after(model, trainer, beta: float, trunk: Trunk | None = None) -> dict:
    """TRL's DPO metrics over every pair with the trained `model`, each pair weighed alike (the
    per-step logs are one batch each, a different batch every step). The reference log-probs are
    the trainer's precomputed dataset columns; each pair's token ids are the ones TRL trained on,
    from the trainer's own collator (EOS rule and truncation included). The policy's log-probs
    are one no-grad pass per pair's prompt, shared by its chosen and rejected completions as a
    token tree (pipeline.lm.teacher_forced.tail_logprobs), instead of `trainer.evaluate`'s full
    forward of each completion with its prompt. rewards/x = beta * (log pi(x) - log pi_ref(x));
    dpo/logps/chosen_change = rewards/chosen / beta: the chosen completions' mean log-prob change
    against the reference (r -> Q*: it falls). With the `trunk` DPO's reference pass recorded
    (pipeline.lm.trunk), each forward starts at its depth."""
    pairs = pair_token_ids(trainer, trainer.train_dataset)
    refs = [(row["ref_chosen_logps"], row["ref_rejected_logps"]) for row in trainer.train_dataset]
    training = model.training
    model.eval()
    try:
        with trainer.accelerator.autocast(), replaying_passes(model, trunk) as tap:
            logps = [sum(tokens) for tokens in tail_logprobs(model, trainer.processing_class, pairs,
                                                            PAIR_METRICS_BATCH, tap)]
    finally:
        model.train(training)
    chosen, rejected = logps[0::2], logps[1::2]
    reward_c = [beta * (c - ref) for c, (ref, _) in zip(chosen, refs)]
    reward_r = [beta * (r - ref) for r, (_, ref) in zip(rejected, refs)]
    found = {"rewards/chosen": reward_c, "rewards/rejected": reward_r,
             "rewards/margins": [c - r for c, r in zip(reward_c, reward_r)],
             "rewards/accuracies": [float(c > r) for c, r in zip(reward_c, reward_r)],
             "logps/chosen": chosen, "logps/rejected": rejected}
    out = {f"dpo/after/{key}": fmean(found[key]) for key in AFTER_KEYS}
    out["dpo/logps/chosen_change"] = out["dpo/after/rewards/chosen"] / beta
    return out
