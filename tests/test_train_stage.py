"""Train stage on the tiny random model: DPO and SFT through TRL, checkpoints, resume, meta.json."""

import importlib.util
import json

import pytest
import torch
from test_prefix_cache import smol_tiny, smol_tokenizer  # noqa: F401 fixtures
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from pipeline.config import ModelConfig, TrainConfig, TrainMode
from pipeline.errors import QstarError
from pipeline.run.atomic import write_jsonl
from pipeline.stages.train import train_policy
from pipeline.stages.trl_trainers import EosAwareCollator, adapted_layers

PROMPT = "<|im_start|>user\nWhat is {} + {}?<|im_end|>\n<|im_start|>assistant\n"


def lineage(kind, terminal):
    return {"iteration": 0, "problem_id": "p", "kind": kind, "prefix_node": 0, "node_ids": [1, 2],
            "q": [0.9, 0.1], "visits": [3, 2], "terminal": terminal, "reward": [None, None]}


def dpo_rows():
    rows = []
    for a, b in ((2, 3), (4, 1), (6, 2), (1, 7)):
        rows.append({"prompt": PROMPT.format(a, b), "chosen": f"Answer: {a + b}\n",
                     "rejected": f"Answer: {a * b + 1}\n", "lineage": lineage("trajectory", [True, True])})
    rows.append({"prompt": PROMPT.format(5, 5), "chosen": "Step 1: 5 + 5 = 10\n",
                 "rejected": "Step 1: 5 * 5 = 25\n", "lineage": lineage("step", [False, False])})
    return rows


def sft_rows():
    return [{"prompt": PROMPT.format(a, b), "completion": f"Step 1: {a} + {b} = {a + b}\nAnswer: {a + b}\n",
             "lineage": lineage("sft", [True])} for a, b in ((2, 3), (4, 1), (6, 2), (1, 7))]


def write_rows(data_dir, dpo=(), sft=()):
    write_jsonl(data_dir / "dpo.jsonl", list(dpo))
    write_jsonl(data_dir / "sft.jsonl", list(sft))
    return data_dir


def config(**overrides):
    # all 5 pairs in one batch: every step sees the same batch, so the losses compare directly
    base = dict(mode=TrainMode.dpo, learning_rate=3e-3, epochs=6, batch_size=5, max_length=128,
                beta=0.5, seed=0)
    return TrainConfig(**{**base, **overrides})


def weights(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items()}


class Killed(Exception):
    pass


class _StopAfterFirstSave(TrainerCallback):
    def __init__(self, phase="dpo"):
        self.phase = phase

    def on_save(self, args, state, control, **kwargs):
        if args.output_dir.endswith(self.phase):
            raise Killed(f"killed after the checkpoint of step {state.global_step}")


def killed_and_resumed(policy, data, cfg, out, phase):
    """train_policy killed after the first checkpoint of `phase`, then run again to the end (a
    checkpoint every step): its metrics and the steps the rerun trained."""
    with pytest.raises(Killed, match="step 1"):
        train_policy(policy, data, cfg, out, save_steps=1, callbacks=[_StopAfterFirstSave(phase)])
    seen = _FirstStep()
    return train_policy(policy, data, cfg, out, save_steps=1, callbacks=[seen]), seen.steps


class _FirstStep(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_dpo_loss_falls_every_parameter_changes_and_checkpoint_loads(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "data", dpo=dpo_rows(), sft=sft_rows())
    out = tmp_path / "train"
    metrics = train_policy(str(tiny_model_dir), data, config(), out, model_cfg=ModelConfig(name="x"))

    assert metrics["policy_dir"] == str(out / "policy") and "skipped" not in metrics
    assert metrics["phases"] == ["dpo"] and metrics["pairs"] == 5 and metrics["dpo/rows"] == 5
    assert metrics["dpo/rows_too_long"] == 0
    assert metrics["steps"] == metrics["dpo/steps"] == 6
    assert metrics["dpo/loss_first"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert metrics["dpo/loss_last"] < metrics["dpo/loss_first"] - 0.05
    assert metrics["dpo/rewards/margins"] > 0 and metrics["dpo/rewards/accuracies"] > 0.5
    for key in ("dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/logps/chosen_first",
                "dpo/logps/chosen_last", "dpo/logps/chosen_change", "dpo/loss_mean", "seconds"):
        assert isinstance(metrics[key], float), key

    before, after = weights(tiny_model_dir), weights(out / "policy")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == []

    model = AutoModelForCausalLM.from_pretrained(out / "policy")
    tokenizer = AutoTokenizer.from_pretrained(out / "policy")
    ids = tokenizer(PROMPT.format(2, 3), return_tensors="pt").input_ids
    assert model(ids).logits.shape[-1] == len(tokenizer)

    meta = json.loads((out / "policy" / "meta.json").read_text())
    assert meta["source_policy"] == str(tiny_model_dir) and meta["iteration"] == 0
    assert meta["rows"] == {"dpo": 5, "sft": 4} and meta["data_dir"] == str(data)
    assert meta["metrics"] == json.loads(json.dumps(metrics))
    assert meta["config"]["mode"] == "dpo" and meta["config"]["learning_rate"] == 3e-3
    assert not list((out / "trainer" / "dpo").glob("checkpoint-*"))  # deleted once saved
    history = json.loads((out / "trainer" / "dpo" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4, 5, 6]
    assert not [p for p in out.rglob(".tmp-*")]

    # done is done: a second call returns the recorded metrics without training
    assert train_policy(str(tiny_model_dir), data, config(), out) == meta["metrics"]


def test_dpo_after_metrics_are_means_over_every_pair(tiny_model_dir, tmp_path):
    """dpo/after/*: the trained policy against the reference over all pairs, computed by hand
    here; the post-hoc path (pair_metrics_of, for runs trained before) gives the same numbers."""
    from pipeline.lm.teacher_forced import completion_logprobs
    from pipeline.stages.train import pair_metrics_of

    rows = dpo_rows()[:4]  # terminal pairs: TRL's EOS ends each completion
    data = write_rows(tmp_path / "data", dpo=rows)
    cfg = config(epochs=3, batch_size=2)  # 2 steps a epoch: the last logged step sees 2 pairs
    metrics = train_policy(str(tiny_model_dir), data, cfg, tmp_path / "train",
                           model_cfg=ModelConfig(name="x"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "train" / "policy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def logps(model, key):
        texts = [r[key] + tokenizer.eos_token for r in rows]
        return [sum(t) for t in completion_logprobs(model, tokenizer, [r["prompt"] for r in rows], texts)]

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    chosen, rejected = logps(policy, "chosen"), logps(policy, "rejected")
    ref_chosen, ref_rejected = logps(reference, "chosen"), logps(reference, "rejected")
    reward_c = [cfg.beta * (a - b) for a, b in zip(chosen, ref_chosen)]
    reward_r = [cfg.beta * (a - b) for a, b in zip(rejected, ref_rejected)]
    assert metrics["dpo/after/logps/chosen"] == pytest.approx(mean(chosen), abs=1e-3)
    assert metrics["dpo/after/logps/rejected"] == pytest.approx(mean(rejected), abs=1e-3)
    assert metrics["dpo/after/rewards/chosen"] == pytest.approx(mean(reward_c), abs=1e-3)
    assert metrics["dpo/after/rewards/margins"] == pytest.approx(
        mean([c - r for c, r in zip(reward_c, reward_r)]), abs=1e-3)
    wins = [c - r > 1e-4 for c, r in zip(reward_c, reward_r)]  # a tie (equal texts to the tiny
    assert 0 < mean(wins) < 1  # tokenizer) is no win; the pairs neither all win nor all lose
    assert metrics["dpo/after/rewards/accuracies"] == mean(wins)
    assert metrics["dpo/logps/chosen_change"] == pytest.approx(mean(chosen) - mean(ref_chosen), abs=1e-2)

    again = pair_metrics_of(str(tmp_path / "train" / "policy"), data, cfg, ModelConfig(name="x"),
                            tmp_path / "posthoc")
    assert again == pytest.approx({k: v for k, v in metrics.items() if k in again}, abs=1e-4)
    assert set(again) == {k for k in metrics if k.startswith("dpo/after/")} | {"dpo/logps/chosen_change"}


@pytest.mark.parametrize("which", ["tiny", "smol_tiny"])
def test_pair_metrics_equal_trls_evaluate(which, tiny_model_dir, tmp_path, request):
    """pair_metrics_after runs each pair's prompt once for both completions (a token tree) on
    the ids TRL's collator gives: the same numbers as TRL's own `evaluate`, with a step pair
    whose EOS is removed, a chosen completion cut by max_length and SmolLM2's real BPE."""
    from pipeline.stages.train import pair_metrics_after
    from pipeline.stages.trl_trainers import dpo_trainer

    if which == "tiny":
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    else:
        model, tokenizer = request.getfixturevalue("smol_tiny")
    rows = dpo_rows()
    rows.append({**rows[0], "chosen": "Step 1: 2 + 3 = 5\n" * 20 + "Answer: 5\n"})  # cut
    longest = max(len(tokenizer(r["prompt"]).input_ids) for r in rows)
    cfg = config(max_length=longest + 12, beta=0.3)
    trainer = dpo_trainer(model, tokenizer, rows, cfg, ModelConfig(name="x"), tmp_path / "out",
                          "none", 10**9, None, False)
    assert trainer.data_collator([trainer.train_dataset[5]])["input_ids"].shape[1] == longest + 12
    with torch.no_grad():  # the trained policy: away from the reference the columns hold
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    ours = pair_metrics_after(model, trainer, cfg.beta)
    trainer.eval_dataset = trainer.train_dataset  # the path it replaces, one pair per batch:
    trainer.args.per_device_eval_batch_size = 1  # TRL averages batch means
    trls = trainer.evaluate()
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert ours[f"dpo/after/{key}"] == pytest.approx(trls[f"eval_{key}"], abs=1e-4), key
    assert ours["dpo/after/rewards/margins"] != 0 and 0 < ours["dpo/after/rewards/accuracies"] < 1


def test_sft_and_dpo_then_sft(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "data", dpo=dpo_rows(), sft=sft_rows())
    sft = train_policy(str(tiny_model_dir), data, config(mode=TrainMode.sft, batch_size=4),
                       tmp_path / "sft")
    assert sft["phases"] == ["sft"] and sft["sft/steps"] == 6 and sft["sft/rows"] == 4
    assert sft["sft/loss_last"] < sft["sft/loss_first"]
    assert "sft/mean_token_accuracy" in sft
    before, after = weights(tiny_model_dir), weights(tmp_path / "sft" / "policy")
    assert all(not torch.equal(before[k], after[k]) for k in before)

    # dpo_then_sft, killed in its SFT phase: the rerun takes DPO's final checkpoint (no DPO step
    # again, and the reference pass is redone on the starting policy) and resumes SFT
    cfg = config(mode=TrainMode.dpo_then_sft, epochs=2)  # 2 DPO steps, then 2 SFT steps
    both, steps = killed_and_resumed(str(tiny_model_dir), data, cfg, tmp_path / "both", "sft")
    assert steps == [2]  # SFT step 2 only
    assert both["phases"] == ["dpo", "sft"] and both["dpo/steps"] == both["sft/steps"] == 2
    assert both["steps"] == 4 and both["loss"] == both["sft/loss_last"]
    assert both["dpo/loss_first"] == pytest.approx(0.6931, abs=1e-3)
    meta = json.loads((tmp_path / "both" / "policy" / "meta.json").read_text())
    assert meta["rows"] == {"dpo": 5, "sft": 4} and meta["metrics"]["mode"] == "dpo_then_sft"

    # the DPO phase's own model is kept inside the policy (the implicit reward's pi), saved
    # again by the resumed run: the weights DPO alone reaches, not the SFT-trained policy's
    assert meta["implicit_policy"] == "dpo_phase" and not (tmp_path / "both" / "dpo_phase").exists()
    kept = tmp_path / "both" / "policy" / "dpo_phase"
    dpo_only = train_policy(str(tiny_model_dir), data, config(epochs=2), tmp_path / "dpo_only")
    assert dpo_only["phases"] == ["dpo"] and "implicit_policy" not in json.loads(
        (tmp_path / "dpo_only" / "policy" / "meta.json").read_text())
    phase, alone, final = weights(kept), weights(tmp_path / "dpo_only" / "policy"), weights(
        tmp_path / "both" / "policy")
    assert all(torch.allclose(phase[k], alone[k], atol=1e-5) for k in phase)
    assert any(not torch.allclose(phase[k], final[k], atol=1e-5) for k in phase)
    # as loaded, not as training left it (activation checkpointing switches the cache off)
    assert json.loads((kept / "config.json").read_text()).get("use_cache", True) is True
    assert (kept / "tokenizer_config.json").is_file()


def test_sft_learning_rate_is_the_sft_phases_own(tiny_model_dir, tmp_path):
    """train.sft_learning_rate sets the SFT phase's step size and leaves DPO's at
    train.learning_rate: with the same schedule (2 steps each), the logged rates are in their
    ratio at every step."""
    data = write_rows(tmp_path / "data", dpo=dpo_rows(), sft=sft_rows())
    cfg = config(mode=TrainMode.dpo_then_sft, epochs=2, learning_rate=3e-3, sft_learning_rate=1e-3)
    train_policy(str(tiny_model_dir), data, cfg, tmp_path / "both")

    def rates(phase):
        history = json.loads((tmp_path / "both" / "trainer" / phase / "log_history.json").read_text())
        return [h["learning_rate"] for h in history if "learning_rate" in h]

    dpo, sft = rates("dpo"), rates("sft")
    assert len(dpo) == len(sft) == 2 and dpo[0] > 0
    assert sft == pytest.approx([r / 3 for r in dpo])
    meta = json.loads((tmp_path / "both" / "policy" / "meta.json").read_text())
    assert meta["config"]["sft_learning_rate"] == 1e-3


def test_no_rows_skips_and_keeps_the_old_policy(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "data", dpo=[], sft=sft_rows())
    out = tmp_path / "train"
    metrics = train_policy(str(tiny_model_dir), data, config(), out)
    assert metrics["policy_dir"] == str(tiny_model_dir) and metrics["steps"] == 0
    assert "no DPO pairs" in metrics["skipped"]
    assert not out.exists()
    missing = train_policy(str(tiny_model_dir), tmp_path / "nothing", config(mode=TrainMode.sft), out)
    assert "skipped" in missing and not out.exists()
    long = [{**row, "prompt": "x" * 130 + row["prompt"]} for row in dpo_rows()]
    write_rows(data, dpo=long)
    metrics = train_policy(str(tiny_model_dir), data, config(), out)
    assert metrics["dpo/rows_too_long"] == 5 and "max_length=128" in metrics["skipped"]
    assert metrics["policy_dir"] == str(tiny_model_dir) and not out.exists()


def test_interrupted_training_resumes_from_its_checkpoint(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "data", dpo=dpo_rows())
    out = tmp_path / "train"
    cfg = config(batch_size=3, epochs=2)  # 2 steps an epoch, 4 in all
    with pytest.raises(Killed, match="step 2"):
        train_policy(str(tiny_model_dir), data, cfg, out, save_steps=2,
                     callbacks=[_StopAfterFirstSave()])
    assert [p.name for p in (out / "trainer" / "dpo").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (out / "policy").exists()

    seen = _FirstStep()
    metrics = train_policy(str(tiny_model_dir), data, cfg, out, save_steps=2, callbacks=[seen])
    assert seen.steps == [3, 4]  # continued after step 2 (in the second epoch), not from 0
    assert metrics["dpo/steps"] == 4
    history = json.loads((out / "trainer" / "dpo" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]
    assert metrics["dpo/loss_first"] == pytest.approx(0.6931, abs=1e-3)

    # the same training uninterrupted reaches the same weights
    straight = train_policy(str(tiny_model_dir), data, cfg, tmp_path / "straight", save_steps=2)
    assert straight["dpo/loss_last"] == pytest.approx(metrics["dpo/loss_last"], rel=1e-4)
    resumed, direct = weights(out / "policy"), weights(tmp_path / "straight" / "policy")
    assert all(torch.allclose(resumed[k], direct[k], atol=1e-5) for k in resumed)


def test_eos_kept_only_where_the_solution_ends():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    eos = 9
    collate = EosAwareCollator(DataCollatorForPreference(pad_token_id=0), eos)
    step = {"prompt_ids": [1, 2], "chosen_ids": [3, 4, eos], "rejected_ids": [5, eos],
            "chosen_eos": False, "rejected_eos": True, "lineage": {"kind": "step"}}
    whole = {"prompt_ids": [1], "chosen_ids": [6, eos], "rejected_ids": [7, eos],
             "chosen_eos": True, "rejected_eos": True, "ref_chosen_logps": -1.0,
             "ref_rejected_logps": -2.0}
    batch = collate([step])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 5, eos]]
    assert batch["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    batch = collate([whole])
    assert batch["input_ids"].tolist() == [[1, 6, eos], [1, 7, eos]]
    assert batch["ref_chosen_logps"].tolist() == [-1.0]


@pytest.mark.skipif(importlib.util.find_spec("peft") is not None, reason="peft is installed")
def test_lora_without_peft_says_how_to_install(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "data", dpo=dpo_rows())
    with pytest.raises(QstarError, match=r"peft>=0.13"):
        train_policy(str(tiny_model_dir), data, config(lora=True), tmp_path / "train")
    assert not (tmp_path / "train" / "policy").exists()


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (a qstar dependency)")
def test_lora_trains_the_linear_layers_merges_and_resumes(tiny_model_dir, tmp_path):
    """train.lora: peft's adapter on every linear layer, merged before saving, so the policy and
    the DPO phase's kept model are plain checkpoints in which only those layers moved; a run
    killed after a DPO checkpoint (the adapter's) resumes at the next step."""
    data = write_rows(tmp_path / "data", dpo=dpo_rows(), sft=sft_rows())
    cfg = config(mode=TrainMode.dpo_then_sft, epochs=2, lora=True, learning_rate=1e-2)
    both, steps = killed_and_resumed(str(tiny_model_dir), data, cfg, tmp_path / "lora", "dpo")
    assert steps == [2, 1, 2]  # DPO step 2, then SFT from its start
    assert both["dpo/loss_first"] == pytest.approx(0.6931, abs=1e-3)  # B = 0: policy == reference
    assert both["dpo/loss_last"] < both["dpo/loss_first"]

    policy = tmp_path / "lora" / "policy"
    before = weights(tiny_model_dir)
    frozen = [name for name in before if not name.endswith("proj.weight")]
    assert frozen  # embeddings and norms: weights LoRA must leave as they were
    for model_dir in (policy, policy / "dpo_phase"):
        assert not (model_dir / "adapter_config.json").exists()
        after = weights(model_dir)
        assert after.keys() == before.keys()
        assert all(torch.equal(before[name], after[name]) for name in frozen)
        assert all(not torch.equal(before[name], after[name]) for name in before if name not in frozen)
    phase, final = weights(policy / "dpo_phase"), weights(policy)
    assert any(not torch.equal(phase[name], final[name]) for name in phase)  # SFT moved it on


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (a qstar dependency)")
def test_lora_on_the_last_layers_moves_only_them(tiny_model_dir, tmp_path):
    """train.lora_layer_fraction: the adapter on the last share of the decoder layers' linear
    modules only (the backward pass stops at the first of them); the rest stays as it was."""
    data = write_rows(tmp_path / "data", dpo=dpo_rows())
    train_policy(str(tiny_model_dir), data, config(epochs=1, lora=True, lora_layer_fraction=0.5,
                                                   learning_rate=1e-2), tmp_path / "half")
    before, after = weights(tiny_model_dir), weights(tmp_path / "half" / "policy")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    last = {name for name in before if name.startswith("model.layers.1.") and name.endswith("proj.weight")}
    assert len(last) == 7  # q, k, v, o, gate, up and down of the tiny model's second layer
    assert moved == last


@pytest.mark.parametrize(("fraction", "layers", "adapted"), [
    (1.0, 30, range(0, 30)), (0.5, 30, range(15, 30)), (0.33, 30, range(20, 30)),
    (0.33, 2, range(1, 2)), (0.01, 30, range(29, 30)), (0.5, 1, range(0, 1))])
def test_adapted_layers_are_the_last_share_rounded_at_least_one(fraction, layers, adapted):
    assert adapted_layers(fraction, layers) == adapted


class _Checkpointing(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(model.is_activation_checkpointing)


def test_activation_checkpointing_saves_memory_not_results(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "data", dpo=dpo_rows())
    trained = {}
    for on in (True, False):
        seen = _Checkpointing()
        train_policy(str(tiny_model_dir), data, config(epochs=1, activation_checkpointing=on),
                     tmp_path / f"train_{on}", model_cfg=ModelConfig(name="x"), callbacks=[seen])
        assert seen.seen == [on]  # on the CPU too, as asked
        trained[on] = weights(tmp_path / f"train_{on}" / "policy")
    for name, value in trained[True].items():  # recomputed activations give the same gradients
        torch.testing.assert_close(value, trained[False][name], rtol=1e-4, atol=1e-5, msg=name)


class _Precision(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append((args.bf16, {p.dtype for p in model.parameters()}))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_cpu_autocast_trains_fp32_weights_under_bf16(tiny_model_dir, tmp_path, dtype):
    """train.cpu_autocast: TRL's bf16 autocast on the CPU where model.dtype is bfloat16 (a no-op
    in float32); the weights stay float32, and the after-training pair metrics run under the
    autocast of TRL's reference pass: at step 0 the policy's log-probs equal the reference's
    closer than bf16 and float32 differ from each other."""
    from pipeline.stages.trl_trainers import dpo_trainer, pair_metrics_after

    seen = _Precision()
    cfg, model_cfg = config(epochs=2, cpu_autocast=True), ModelConfig(name="x", dtype=dtype)
    data = write_rows(tmp_path / "data", dpo=dpo_rows())
    metrics = train_policy(str(tiny_model_dir), data, cfg, tmp_path / "train", model_cfg=model_cfg,
                           callbacks=[seen])
    assert seen.seen == [(dtype == "bfloat16", {torch.float32})] * 2
    assert metrics["dpo/loss_first"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert metrics["dpo/loss_last"] < metrics["dpo/loss_first"]
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "train" / "policy")
    assert {p.dtype for p in saved.parameters()} == {torch.float32}
    if dtype == "float32":
        return
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = pair_metrics_after(model, dpo_trainer(  # the same model and pairs in float32
        model, tokenizer, dpo_rows(), config(), model_cfg, tmp_path / "fp32", "none", 10, None,
        False), cfg.beta)
    autocast = pair_metrics_after(model, dpo_trainer(
        model, tokenizer, dpo_rows(), cfg, model_cfg, tmp_path / "bf16", "none", 10, None, False),
        cfg.beta)
    gap = abs(autocast["dpo/after/logps/chosen"] - plain["dpo/after/logps/chosen"])
    assert gap > 0  # bf16 ran
    assert abs(autocast["dpo/logps/chosen_change"]) < gap / 2


@pytest.mark.parametrize("size", [8, 1, 5])
def test_reference_log_probs_are_each_pairs_own_at_any_batch(tiny_model_dir, tmp_path, size):
    """train.reference_batch_size: pairs per token tree in the reference pass before DPO; each
    pair's reference log-probs stay its own: computed here by hand, one text at a time (a step
    option without the EOS TRL appends, a terminal one with it)."""
    from pipeline.lm.teacher_forced import completion_logprobs
    from pipeline.stages.trl_trainers import dpo_trainer

    # another dataset each time: no cached pass is reused
    rows = {8: dpo_rows()[1:], 1: dpo_rows(), 5: dpo_rows()[::-1]}[size]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = dpo_trainer(model, tokenizer, rows, config(reference_batch_size=size),
                          ModelConfig(name="x"), tmp_path / "out", "none", 10, None, False)
    assert trainer.args.precompute_ref_log_probs  # the columns TRL's loss reads
    for side in ("chosen", "rejected"):
        texts = [r[side] + (tokenizer.eos_token if r["lineage"]["terminal"][0] else "") for r in rows]
        hand = [sum(t) for t in completion_logprobs(model, tokenizer, [r["prompt"] for r in rows], texts)]
        assert trainer.train_dataset[f"ref_{side}_logps"] == pytest.approx(hand, abs=1e-4)


def test_reference_pass_of_a_lora_model_runs_with_its_adapter_off(tiny_model_dir, tmp_path):
    """With LoRA and no separate reference, the reference is the model under the adapter: a
    trained (non-zero) adapter changes the policy's log-probs but not the reference pass's,
    which equal the plain model's."""
    from pipeline.lm.teacher_forced import tail_logprobs
    from pipeline.stages.trl_trainers import dpo_trainer, pair_token_ids, reference_logps

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = dpo_trainer(model, tokenizer, dpo_rows(), config(), ModelConfig(name="x"),
                        tmp_path / "plain", "none", 10, None, False).train_dataset
    trainer = dpo_trainer(model, tokenizer, dpo_rows(), config(lora=True), ModelConfig(name="x"),
                          tmp_path / "lora", "none", 10, None, False)
    with torch.no_grad():  # as if trained: the adapter now moves the outputs
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn_like(param) * 0.5)
    chosen, rejected = reference_logps(trainer, trainer.train_dataset, 16)
    assert chosen == pytest.approx(plain["ref_chosen_logps"], abs=1e-4)
    assert rejected == pytest.approx(plain["ref_rejected_logps"], abs=1e-4)
    adapted = [sum(lp) for lp in tail_logprobs(  # the adapter on: the policy scores them otherwise
        trainer.model.get_base_model(), tokenizer, pair_token_ids(trainer, trainer.train_dataset), 16)]
    assert max(abs(a - r) for a, r in zip(adapted[0::2], plain["ref_chosen_logps"])) > 0.1


def test_freed_memory_goes_back_before_each_phase_and_after_its_reference_pass(
        tiny_model_dir, tmp_path, monkeypatch):
    """Each phase starts on trimmed memory, and training steps start after the reference pass's
    leftovers are returned (the demo's train stage peaks in its DPO steps)."""
    events = []

    class Begin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            events.append("train")

    monkeypatch.setattr("pipeline.stages.train.release_freed_memory", lambda: events.append("release"))
    data = write_rows(tmp_path / "data", dpo=dpo_rows(), sft=sft_rows())
    train_policy(str(tiny_model_dir), data, config(mode=TrainMode.dpo_then_sft, epochs=1),
                 tmp_path / "out", callbacks=[Begin()])
    assert events == ["release", "release", "train"] * 2


class _ProjectedRows:
    """Counts the positions TRL's fused LM head projects onto the vocabulary."""

    def __init__(self, monkeypatch):
        import trl.trainer.utils as trl_utils

        self.rows, function = [], trl_utils._ChunkedLogProbFunction
        count = self.rows.append

        class Spy:
            @staticmethod
            def apply(hidden, *args):
                count(hidden.shape[0])
                return function.apply(hidden, *args)

        monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Spy)


def _labelled_positions(trainer) -> int:
    """Completion tokens of every pair, chosen and rejected, as TRL's collator masks them."""
    return sum(int(trainer.data_collator([row])["completion_mask"].sum())
               for row in trainer.train_dataset)


def test_lm_head_projects_only_the_completion_tokens(tiny_model_dir, tmp_path, monkeypatch):
    """On a CPU TRL's fused LM head would project every position, the prompt's too; the train
    stage's DPO steps project the completion tokens alone, and its reference pass (token trees,
    reference_pass_as_token_trees) does not use TRL's head: it projects each distinct completion
    prefix once, no more rows than the labelled positions, for the same log-probs as TRL's own
    pass (test_reference_log_probs_are_each_pairs_own_at_any_batch checks them by hand too)."""
    from trl import DPOConfig, DPOTrainer

    from pipeline.stages.trl_trainers import dpo_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, cfg = dpo_rows(), config(epochs=1)
    spy = _ProjectedRows(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    projected = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _o: projected.append(args[0].shape[0]))
    trainer = dpo_trainer(model, tokenizer, rows, cfg, ModelConfig(name="x"), tmp_path / "t",
                          "none", 10, None, False)
    hook.remove()
    labelled = _labelled_positions(trainer)
    assert spy.rows == [] and 0 < sum(projected) <= labelled  # the reference pass: token trees

    spy.rows.clear()  # TRL's own path, outside the context: every position of the padded batch
    trls = DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / "plain"), use_cpu=True,
                                                  precompute_ref_log_probs=True, report_to="none",
                                                  per_device_train_batch_size=5),
                      train_dataset=trainer.train_dataset.remove_columns(
                          ["ref_chosen_logps", "ref_rejected_logps"]), processing_class=tokenizer,
                      data_collator=trainer.data_collator)  # the same ids (the EOS rule)
    assert sum(spy.rows) > 2 * labelled
    for side in ("chosen", "rejected"):
        assert trainer.train_dataset[f"ref_{side}_logps"] == pytest.approx(
            trls.train_dataset[f"ref_{side}_logps"], rel=1e-4)  # TRL's chunked head: 5e-5 apart

    spy.rows.clear()
    data = write_rows(tmp_path / "data", dpo=rows)
    train_policy(str(tiny_model_dir), data, cfg, tmp_path / "train", model_cfg=ModelConfig(name="x"))
    assert sum(spy.rows) == labelled  # one epoch of steps
    import trl.trainer.utils as trl_utils

    assert not trl_utils._use_triton(torch.device("cpu"))  # after the stage, TRL's own rule again
    assert DPOTrainer._precompute_ref_logps.__name__ == "_precompute_ref_logps"  # TRL's again


def test_sft_phase_projects_only_the_completion_tokens(tiny_model_dir, tmp_path, monkeypatch):
    """The SFT phase too: one epoch projects each row's completion tokens, once."""
    from pipeline.stages.trl_trainers import sft_trainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = config(mode=TrainMode.sft, epochs=1)
    trainer = sft_trainer(model, tokenizer, sft_rows(), cfg, ModelConfig(name="x"), tmp_path / "t",
                          "none", 10, None, False)
    labelled = sum(sum(label != -100 for label in row["labels"]) for row in trainer.train_dataset)
    spy = _ProjectedRows(monkeypatch)
    data = write_rows(tmp_path / "data", sft=sft_rows())
    train_policy(str(tiny_model_dir), data, cfg, tmp_path / "train", model_cfg=ModelConfig(name="x"))
    assert sum(spy.rows) == labelled
