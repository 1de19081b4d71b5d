"""Continuous batching (pipeline/lm/running_batch.py): rows join a running batch as others
leave. Joining only adds masked padding, so every row's tokens, log-probs and hidden states
must equal what it gets decoded alone; and rows must really join a batch that is mid-way."""

from __future__ import annotations

import pytest
import torch
from test_prefix_cache import prompts_for, smol_tiny, smol_tokenizer, varied  # noqa: F401 fixtures
from transformers import DynamicCache

from mcts.options import newline
from pipeline.lm import running_batch
from pipeline.lm.generation import generate, row_seed
from pipeline.lm.prefix_cache import Prefilled, PrefixCache
from pipeline.lm.running_batch import HiddenSlots, RunningBatch


def _joins(monkeypatch) -> list[int]:
    """Record, for every join, how many rows were already running."""
    seen: list[int] = []
    join = RunningBatch.join

    def spy(self, start, rows):
        seen.append(len(self.live))
        join(self, start, rows)

    monkeypatch.setattr(RunningBatch, "join", spy)
    return seen


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
def test_rows_joining_a_running_batch_decode_as_if_alone(which, temperature, request, monkeypatch):
    model, tokenizer = request.getfixturevalue(which)
    prompts = [p for p in prompts_for(tokenizer) for _ in range(2)]  # 6 lengths, shared prefills
    seeds = [row_seed(3, i) for i in range(len(prompts))]
    kwargs = dict(max_new_tokens=8, temperature=temperature, stop=newline(8), rollout_tokens=6,
                  rollout_temperature=temperature, hidden=True)
    alone = [generate(model, tokenizer, [p], seeds=[s], **kwargs)[0] for p, s in zip(prompts, seeds)]
    joins = _joins(monkeypatch)
    store = PrefixCache(16)
    running = generate(model, tokenizer, prompts, seed=3, batch_size=4, prefix_cache=store, **kwargs)
    assert any(n > 0 for n in joins)  # rows joined a batch that was already decoding
    for a, b in zip(alone, running, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text and a.rollout == b.rollout
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert (a.rollout_logprobs or []) == pytest.approx(b.rollout_logprobs or [], abs=1e-4)
        for h in ("prompt_hidden", "option_hidden", "end_hidden"):
            assert torch.allclose(getattr(a, h), getattr(b, h), atol=1e-4)
    assert len({g.text + g.rollout for g in running}) > 2  # not vacuous: the rows differ


def test_seed_gives_each_row_its_own_stream(request):
    """`seed` seeds every row apart: a row's sample does not depend on the batch size."""
    model, tokenizer = request.getfixturevalue("varied")
    prompts = prompts_for(tokenizer) * 2
    kwargs = dict(max_new_tokens=10, temperature=1.0, seed=11)
    wide = generate(model, tokenizer, prompts, batch_size=32, **kwargs)
    narrow = generate(model, tokenizer, prompts, batch_size=3, **kwargs)
    assert [g.token_ids for g in wide] == [g.token_ids for g in narrow]
    assert wide[0].token_ids != wide[6].token_ids  # same prompt, own stream


def test_no_prompts_or_no_new_tokens_give_empty_results(request):
    model, tokenizer = request.getfixturevalue("varied")
    assert generate(model, tokenizer, [], max_new_tokens=5) == []
    empty = generate(model, tokenizer, prompts_for(tokenizer)[:2], max_new_tokens=0)
    assert [(g.token_ids, g.text, g.finished) for g in empty] == [([], "", False)] * 2


def _prefilled(lengths: list[int], fill: float) -> Prefilled:
    """Rows whose real tokens are the last `length` of a common cache length (left padding)."""
    width = max(lengths)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    kv = torch.full((len(lengths), 1, width, 2), fill) * mask[:, None, :, None]
    cache = DynamicCache([(kv.clone(), kv.clone() + 1)])
    return Prefilled(cache, mask, torch.full((len(lengths), 3), fill), [[0]] * len(lengths))


def test_join_pads_the_shorter_cache_on_the_left_and_keep_trims_padding():
    batch = RunningBatch()
    batch.join(_prefilled([5, 3], 1.0), [0, 1])
    batch.join(_prefilled([2], 2.0), [7])
    assert batch.live == [0, 1, 7]
    assert batch.mask.tolist() == [[1] * 5, [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    keys = batch.cache.layers[0].keys
    assert keys.shape == (3, 1, 5, 2)
    assert keys[2, 0, :, 0].tolist() == [0, 0, 0, 2, 2]  # real tokens stay at the right end
    assert batch.logits[:, 0].tolist() == [1, 1, 2]
    index = batch.keep([1, 2])  # the longest row leaves: two leading columns are padding now
    assert index.tolist() == [1, 2] and batch.live == [1, 7]
    assert batch.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert batch.cache.layers[0].keys.shape == (2, 1, 3, 2)
    assert batch.cache.layers[0].values[1, 0, :, 0].tolist() == [0, 3, 3]  # joined padding is 0
    assert batch.keep([0, 1]) is None  # everyone stays
    batch.keep([])
    assert batch.live == [] and batch.cache is None


def test_wants_rows_waits_for_a_share_of_the_batch_to_be_free(monkeypatch):
    monkeypatch.setattr(running_batch, "JOIN_WHEN_FREE", 0.25)
    batch = RunningBatch(live=list(range(30)))
    assert not batch.wants_rows(32, waiting=10, can_join=True)  # 2 free < 8
    assert batch.wants_rows(32, waiting=2, can_join=True)  # the last 2 rows fit
    batch.live = list(range(24))
    assert batch.wants_rows(32, waiting=10, can_join=True)
    assert not batch.wants_rows(32, waiting=10, can_join=False)  # no joining: wait for empty
    assert not batch.wants_rows(32, waiting=0, can_join=True)
    assert RunningBatch().wants_rows(32, waiting=1, can_join=False)


def test_hidden_slots_are_reused_and_read_per_row():
    slots = HiddenSlots(steps=4)
    states = torch.arange(6.0).reshape(3, 2)  # rows 5, 6, 7 at their token 0
    slots.write([5, 6, 7], torch.tensor([0, 0, 0]), states)
    slots.write([5, 7], torch.tensor([1, 1]), states[:2] + 10)
    out = slots.read([(7, 0, 1)])
    assert out.tolist() == [[[4.0, 5.0], [12.0, 13.0]]]
    slots.write([9], torch.tensor([0]), torch.tensor([[-1.0, -1.0]]))  # takes row 7's slot
    assert len(slots.buffer) == 3
    assert slots.read([(5, 0, 1), (9, 0, 0)]).tolist() == [[[0, 1], [10, 11]], [[-1, -1], [-1, -1]]]


def test_a_sliding_window_model_decodes_in_whole_batches(tmp_path, monkeypatch):
    """KV layers that are not plain (a sliding window) cannot be padded and stacked: rows then
    join only an empty batch, and still decode as if alone."""
    from tiny import tiny_tokenizer
    from transformers import MistralConfig, MistralForCausalLM

    from critics.shared_prompt import plain_kv_layers
    from pipeline.config import ModelConfig
    from pipeline.lm.models import load_model

    tokenizer = tiny_tokenizer()
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        sliding_window=64, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(1)
    MistralForCausalLM(config).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    model, tokenizer = load_model(ModelConfig(name=str(tmp_path / "m")))
    assert not plain_kv_layers(model)
    prompts = prompts_for(tokenizer)
    alone = [generate(model, tokenizer, [p], max_new_tokens=6)[0] for p in prompts]
    joins = _joins(monkeypatch)
    together = generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=4)
    assert joins == [0, 0]  # 4 rows, then the other 2 once the first 4 are done
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]


def test_the_batch_never_holds_more_than_batch_size_rows(request, monkeypatch):
    model, tokenizer = request.getfixturevalue("varied")
    prompts = [p for p in prompts_for(tokenizer) for _ in range(3)]  # a prompt's rows straddle joins
    sizes: list[int] = []
    join = RunningBatch.join

    def spy(self, start, rows):
        join(self, start, rows)
        sizes.append(len(self.live))

    monkeypatch.setattr(RunningBatch, "join", spy)
    out = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.0, seed=2,
                   batch_size=4)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8, temperature=1.0,
                      seeds=[row_seed(2, i)])[0] for i, p in enumerate(prompts)]
    assert len(sizes) > 2 and max(sizes) <= 4
    assert [g.token_ids for g in out] == [g.token_ids for g in alone]


def test_plain_kv_layers_is_not_fooled_by_a_reused_config_id(monkeypatch):
    """The answer is cached per config object: a new config that gets a freed config's id (as
    CPython reuses ids) is looked at afresh, not given the old config's answer."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, MistralConfig

    from critics import shared_prompt

    small = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2)
    plain = SimpleNamespace(config=LlamaConfig(**small))
    assert shared_prompt.plain_kv_layers(plain)
    windowed = SimpleNamespace(config=MistralConfig(sliding_window=4, **small))
    # the Llama config is freed and its id handed to the Mistral one
    monkeypatch.setitem(shared_prompt._PLAIN_KV, id(windowed.config),
                        shared_prompt._PLAIN_KV.pop(id(plain.config)))
    del plain
    assert not shared_prompt.plain_kv_layers(windowed)
    assert shared_prompt.plain_kv_layers(SimpleNamespace(config=LlamaConfig(**small)))
