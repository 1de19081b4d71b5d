"""The frozen trunk (pipeline.lm.trunk): DPO's reference pass records what enters the first
LoRA-adapted layer, and the training steps start there, with the same results."""

import pytest
import torch
from test_prefix_cache import smol_tiny, smol_tokenizer  # noqa: F401 fixtures
from test_train_stage import config, dpo_rows, weights, write_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

import pipeline.stages.trl_trainers as trl_trainers
from critics.shared_prompt import TREE_TOKENS
from pipeline.config import TrainMode
from pipeline.lm import trunk as trunk_module
from pipeline.lm.teacher_forced import tail_logprobs
from pipeline.lm.trunk import Replay, Trunk, frozen_depth, replaying, replaying_passes
from pipeline.stages.train import train_policy


def _count_replays(monkeypatch) -> list[int]:
    """How many training forwards the trunk served (Trunk.batch returned states)."""
    served = []
    batch = Trunk.batch

    def counting(self, input_ids, mask):
        found = batch(self, input_ids, mask)
        served.append(found is not None)
        return found
    monkeypatch.setattr(Trunk, "batch", counting)
    return served


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "smol_tiny"])
def test_dpo_steps_from_the_recorded_trunk_train_the_same_weights(model_dir, tmp_path, monkeypatch,
                                                                   request):
    """LoRA on the last of two layers, one pair per forward: every step replays the trunk the
    reference pass recorded, and the policy, losses and DPO metrics are those of full forwards
    (to float rounding: the trunk came from a token tree). With SmolLM2's tokenizer too."""
    policy = request.getfixturevalue(model_dir)
    policy = str(policy if not isinstance(policy, tuple) else policy[0].name_or_path)
    data = write_rows(tmp_path / "data", dpo=dpo_rows())
    cfg = config(epochs=2, batch_size=1, lora=True, lora_layer_fraction=0.5, learning_rate=1e-2,
                 activation_checkpointing=False)
    served = _count_replays(monkeypatch)
    replayed = []
    before = Replay.before
    monkeypatch.setattr(Replay, "before", lambda self, *a: (replayed.append(a[0]), before(self, *a)))
    shared = train_policy(policy, data, cfg, tmp_path / "shared")
    assert served and all(served)  # every training forward started at the adapted layer
    assert "rows" in replayed  # and so did the pair metrics' passes after training
    monkeypatch.setattr(trunk_module, "SHARE_TRUNK", False)
    served.clear()
    replayed.clear()
    whole = train_policy(policy, data, cfg, tmp_path / "whole")
    assert not served and not replayed
    a, b = weights(tmp_path / "shared" / "policy"), weights(tmp_path / "whole" / "policy")
    assert any(not torch.equal(a[k], weights(policy)[k]) for k in a)  # training moved it
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    for key in ("dpo/loss_first", "dpo/loss_last", "dpo/after/rewards/margins"):
        assert shared[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-5)


def test_no_trunk_without_frozen_layers_or_with_checkpointing():
    model = AutoModelForCausalLM.from_config(_llama(layers=4))
    every = config(lora=True)
    assert trl_trainers.dpo_trunk(every, model, None) is None  # every layer adapted
    last = config(lora=True, lora_layer_fraction=0.5, activation_checkpointing=False)
    assert trl_trainers.dpo_trunk(last, model, None).depth == 2
    assert trl_trainers.dpo_trunk(last, model, ref_model=model) is None  # another reference
    assert trl_trainers.dpo_trunk(config(lora=True, lora_layer_fraction=0.5,
                                         activation_checkpointing=True), model, None) is None
    assert trl_trainers.dpo_trunk(config(), model, None) is None  # the full fine-tune


def _llama(layers):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=2)


def test_frozen_depth_counts_leading_layers_without_trainable_weights():
    model = AutoModelForCausalLM.from_config(_llama(layers=4))
    assert frozen_depth(model) == 0  # the embeddings train
    for p in model.parameters():
        p.requires_grad_(False)
    assert frozen_depth(model) == 0  # nothing trains: no adapted layer to start at
    for p in model.model.layers[3].parameters():
        p.requires_grad_(True)
    assert frozen_depth(model) == 3
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(True)
    assert frozen_depth(model) == 1


@pytest.mark.parametrize("tree", [True, False])
def test_recorded_trunk_is_what_a_plain_forward_gives(tiny_model_dir, tree, monkeypatch):
    """The tap files each sequence's states, prefix, prompt and completion positions alike, from
    token trees or right-padded batches; a replayed forward of those rows gives the plain logits,
    and a row it did not record runs whole."""
    import critics.shared_prompt as shared_prompt

    monkeypatch.setattr(shared_prompt, "TREE_TOKENS", TREE_TOKENS if tree else 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    head = "a shared instruction that opens every prompt: "
    pairs = [(tokenizer(head + q).input_ids, tokenizer(c).input_ids)
             for q in ("2 + 3 = ?", "7 + 1 = ?") for c in ("5", "51", "6 and more", "")]
    trunk = Trunk(depth=1)
    with torch.no_grad(), trunk.recording(model):
        tail_logprobs(model, tokenizer, pairs, 3, trunk)
    assert len(trunk.states) == len(pairs)
    for p in model.model.parameters():
        p.requires_grad_(False)
    for p in model.model.layers[1].parameters():
        p.requires_grad_(True)
    seqs = [p + c for p, c in pairs[:3]]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with replaying(model, trunk):
            replayed = model(input_ids=ids, attention_mask=mask).logits
            unknown = model(input_ids=ids[:, :-1] + 1, attention_mask=mask[:, :-1]).logits
        again = model(input_ids=ids[:, :-1] + 1, attention_mask=mask[:, :-1]).logits
    real = mask.bool()
    torch.testing.assert_close(replayed[real], plain[real], rtol=1e-4, atol=1e-5)
    assert torch.equal(unknown, again)  # not recorded: every layer ran


@pytest.mark.parametrize("tree", [True, False])
def test_replayed_passes_give_the_same_logprobs_without_the_trunks_layers(tiny_model_dir, tree,
                                                                         monkeypatch):
    """A teacher-forced pass given the Replay tap runs none of the trunk's layers (zeros stand in
    their KV slots) and gives the log-probs of a whole pass, at another batch size than the
    recording's; a pass with a pair the trunk lacks runs whole."""
    import critics.shared_prompt as shared_prompt

    monkeypatch.setattr(shared_prompt, "TREE_TOKENS", TREE_TOKENS if tree else 0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    head = "the same instruction opens every prompt here: "
    pairs = [(tokenizer(head + q).input_ids, tokenizer(c).input_ids)
             for q in ("4 + 4 = ?", "9 + 2 = ?") for c in ("8", "81", "11 or so", "")]
    # one token sequence split two ways: a step pair's prompt holds a trajectory's first step
    step = pairs[6][0] + pairs[6][1][:3]
    pairs += [(step, pairs[6][1][3:]), (step, tokenizer(" or 12").input_ids)]
    trunk = Trunk(depth=1)
    with torch.no_grad(), trunk.recording(model):
        recorded = tail_logprobs(model, tokenizer, pairs, 4, trunk)
    ran = []
    model.model.layers[0].mlp.register_forward_hook(lambda *a: ran.append(1))
    with torch.no_grad(), replaying_passes(model, trunk) as tap:
        assert tap is not None
        replayed = tail_logprobs(model, tokenizer, pairs, 3, tap)
        assert not ran
        other = [(pairs[0][0], tokenizer("7").input_ids), *pairs[:2]]
        tail_logprobs(model, tokenizer, other, 3, tap)
        assert ran  # not covered: every layer ran
    for a, b in zip(recorded, replayed, strict=True):
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.0)  # changed in place since the recording
    with replaying_passes(model, trunk) as tap:
        assert tap is None


def test_refit_implicit_pass_replays_the_policys_trunk(tiny_model_dir, tmp_path, monkeypatch):
    """After LoRA on the last layer (DPO then SFT), the policy, its DPO phase and its reference
    share the first layer: the features pass records it, and the implicit reward's passes of
    the DPO phase and the reference start above it, with the rewards of whole passes."""
    from test_train_stage import sft_rows

    from critics.features import backbone_features
    from pipeline.config import ModelConfig
    from pipeline.lm.models import load_model
    from pipeline.stages.reference import (
        dpo_reference,
        implicit_critic,
        implicit_policy,
        trained_trunk,
    )

    data = write_rows(tmp_path / "data", dpo=dpo_rows(), sft=sft_rows())
    cfg = config(mode=TrainMode.dpo_then_sft, epochs=1, batch_size=1, lora=True,
                 lora_layer_fraction=0.5, learning_rate=1e-2, activation_checkpointing=False)
    train_policy(str(tiny_model_dir), data, cfg, tmp_path / "train")
    policy = str(tmp_path / "train" / "policy")
    trunk = trained_trunk(policy, layers=2)
    assert trunk is not None and trunk.depth == 1
    model, tokenizer = load_model(ModelConfig(name=policy))
    rows = dpo_rows()
    prompts = [r["prompt"] for r in rows for _ in range(2)]
    texts = [r[side] for r in rows for side in ("chosen", "rejected")]
    with trunk.recording(model):
        backbone_features(model, tokenizer, prompts, texts, 4, 256, logprobs=True, tap=trunk)
    replayed = []
    before = Replay.before
    monkeypatch.setattr(Replay, "before", lambda self, *a: (replayed.append(a[0]), before(self, *a)))
    args = (dpo_reference(policy), model, tokenizer, ModelConfig(), 4, "here", implicit_policy(policy))
    shared = implicit_critic(*args, trunk=trunk).of_texts(prompts, texts)
    assert replayed.count("prompt") >= 2 * len(rows)  # both models' passes, every prompt
    replayed.clear()
    whole = implicit_critic(*args).of_texts(prompts, texts)
    assert not replayed
    assert any(abs(w) > 1e-3 for w in whole)  # DPO moved the policy from its reference
    assert shared == pytest.approx(whole, rel=1e-4, abs=1e-5)
