"""The DPO reference pi_ref: chosen for training (`train.reference`), recorded in the trained
policy's meta.json, and read back wherever the policy's implicit reward
beta * (log pi - log pi_ref) is a critic (search leaves, best-of-N selection, critic metrics).

At evaluation time the reference of policy_{i+1} is the one its DPO phase trained against:
policy_i with `train.reference=previous` (the default), policy_0 with `train.reference=base`,
policy_i after this iteration's SFT phase with `train.reference=sft` (kept inside the policy's
directory as `sft_phase/`, which meta.json's `reference` names).
The base model, and a policy no DPO phase trained, have no reference and no implicit reward.

The policy pi of the log-ratio is the DPO phase's own model. With `train.mode=dpo_then_sft` the
policy that generates is DPO's model trained on by SFT, and SFT's change is no DPO reward: the
train stage keeps the DPO phase's model inside the policy's directory (`dpo_phase/`, recorded as
meta.json's `implicit_policy`), and the reward teacher-forces it. Policies saved before it was
kept use the policy itself.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

from critics import ImplicitCritic
from pipeline.config import CriticsConfig, ModelConfig, TrainConfig, replace_model_name
from pipeline.errors import QstarError
from pipeline.lm import trunk as trunk_lib
from pipeline.lm.models import load_model, resolve_model_path
from pipeline.lm.teacher_forced import completion_logprobs, token_logprobs, trunk_logprobs
from pipeline.lm.trunk import Trunk
from pipeline.run.atomic import atomic_dir
from pipeline.run.progress import weight_bars_off
from pipeline.stages.trl_trainers import adapted_layers

DPO_PHASE = "dpo_phase"  # the DPO phase's model, inside a policy a later phase trained on
SFT_PHASE = "sft_phase"  # the SFT phase's model, inside a policy DPO trained against it
KEPT_PHASES = (DPO_PHASE, SFT_PHASE)  # models a policy may keep beside its own weights


def _dpo_meta(policy_dir: str) -> dict | None:
    """The policy's meta.json when a DPO phase trained it, else None."""
    path = Path(policy_dir) / "meta.json"
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    return meta if "dpo" in meta.get("metrics", {}).get("phases", []) else None


def dpo_reference(policy_dir: str) -> tuple[str, float] | None:
    """(reference, beta) of a policy trained by DPO, from its meta.json. None for the base model
    and for a policy no DPO phase trained. Policies saved before `reference` was recorded were
    trained against their source policy (the only choice then)."""
    meta = _dpo_meta(policy_dir)
    if meta is None:
        return None
    reference = meta.get("reference") or meta["source_policy"]
    beside = Path(policy_dir) / reference  # recorded relative to the policy: the run can move
    if not Path(reference).is_absolute() and beside.is_dir():
        reference = str(beside.resolve())
    elif reference == SFT_PHASE:  # kept inside the policy, never a model name
        raise QstarError(f"{Path(policy_dir) / 'meta.json'}: reference={reference!r} is not a "
                         "directory beside it (the SFT phase's model; copy the policy whole)")
    return reference, float(meta["config"]["beta"])


def reference_dir(policy_dir: str, model_cfg: ModelConfig) -> str | None:
    """The policy's DPO reference as a checkpoint directory (the base model is recorded by name
    and resolved through the model cache); None for a policy no DPO phase trained."""
    found = dpo_reference(policy_dir)
    if found is None:
        return None
    return found[0] if Path(found[0]).is_dir() else resolve_model_path(
        replace_model_name(model_cfg, found[0]))


def implicit_policy(policy_dir: str) -> str | None:
    """The directory of the DPO phase's own model when a later phase trained the policy on
    (meta.json's `implicit_policy`, inside the policy's directory); None when DPO was its last
    phase, for a policy no DPO phase trained, and for policies saved before it was kept."""
    meta = _dpo_meta(policy_dir)
    kept = meta and meta.get("implicit_policy")
    if not kept:
        return None
    path = Path(policy_dir) / kept
    if not path.is_dir():
        raise QstarError(f"{Path(policy_dir) / 'meta.json'}: implicit_policy={kept!r} is not a "
                         f"directory beside it (the DPO phase's model; copy the policy whole)")
    return str(path)


def searches_implicit(cfg: CriticsConfig) -> bool:
    """Whether MCTS's leaf value has an implicit-reward part (before or once critics exist):
    only then does search need the policy's DPO reference and kept DPO phase."""
    return max(cfg.weights.implicit, cfg.trained_weights.implicit) > 0


def load_implicit(policy_dir: str, model, tokenizer, model_cfg: ModelConfig,
                  batch_size: int) -> ImplicitCritic | None:
    """The policy's implicit reward as a critic (None without a DPO reference); `model` is the
    loaded policy, the reference (and the DPO phase's model, if kept) is loaded beside it."""
    found = dpo_reference(policy_dir)
    if found is None:
        return None
    return implicit_critic(found, model, tokenizer, model_cfg, batch_size,
                           str(Path(policy_dir) / "meta.json"), implicit_policy(policy_dir))


def implicit_critic(reference: tuple[str, float], model, tokenizer, model_cfg: ModelConfig,
                    batch_size: int, where: str, dpo_phase: str | None = None,
                    trunk: Trunk | None = None) -> ImplicitCritic:
    """The implicit reward against (reference path, beta): of `model`, or of the DPO phase's
    model at `dpo_phase` when a later phase made `model` (then `model` only generates); `where`
    names the reference's source in the one-line error when it cannot be loaded. Its text
    passes start above `trunk` (pipeline.lm.trunk) where the models compute its states."""
    path, beta = reference
    try:
        ref_model, _ = load_model(replace(model_cfg, name=path))
    except QstarError as exc:
        raise QstarError(f"{where}: reference={path!r} cannot be loaded ({exc})") from None
    if dpo_phase is not None:  # its own tokenizer: `model` may be a separate critics backbone
        model, tokenizer = load_model(replace(model_cfg, name=dpo_phase))
    texts = partial(trunk_logprobs, trunk=trunk) if trunk is not None else completion_logprobs
    return ImplicitCritic(model, ref_model, tokenizer, beta, texts, token_logprobs,
                          batch_size, generates=dpo_phase is None)


def trained_trunk(policy_dir: str, layers: int) -> Trunk | None:
    """A Trunk to record below the first layer the policy's LoRA training adapted (meta.json's
    train config), which its DPO reference and DPO phase share with it; None when every layer
    trained (or SHARE_TRUNK is off). Policies saved before `lora_layer_fraction` adapted every
    layer."""
    meta = _dpo_meta(policy_dir)
    cfg = meta["config"] if meta else {}
    if not (trunk_lib.SHARE_TRUNK and cfg.get("lora") and "lora_layer_fraction" in cfg):
        return None
    depth = adapted_layers(cfg["lora_layer_fraction"], layers).start
    return Trunk(depth) if depth > 0 else None


def keep_phase(path: Path, model, tokenizer, use_cache: bool | None) -> None:
    """A phase's model as it is when the phase ends (LoRA already merged), with its tokenizer,
    atomically at `path`; its config's use_cache as loaded (training may have switched it off).
    The train stage moves it into the policy it saves (DPO_PHASE, SFT_PHASE)."""
    training = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = use_cache
    try:
        with atomic_dir(path) as tmp, weight_bars_off():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    finally:
        if training is not None:
            model.config.use_cache = training


def training_reference(reference_dir: str, policy_dir: str, cfg: TrainConfig,
                       model_cfg: ModelConfig):
    """TRL DPOTrainer's ref_model: None when the reference is the starting policy (TRL's
    reference pass then runs the untrained model itself), else the reference, loaded once for
    that pass (the train stage frees it before training)."""
    if Path(reference_dir).resolve() == Path(policy_dir).resolve():
        return None
    import torch  # heavy: only the train stage's worker needs it here
    from transformers import AutoModelForCausalLM

    try:
        with weight_bars_off():
            return AutoModelForCausalLM.from_pretrained(
                reference_dir, dtype=torch.float32, trust_remote_code=model_cfg.trust_remote_code)
    except OSError as exc:
        raise QstarError(f"train.reference={cfg.reference.value}: cannot load the reference model "
                         f"at {reference_dir} ({str(exc).splitlines()[0]})") from None
