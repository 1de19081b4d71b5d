"""The KV cache layer that grows in place (pipeline/lm/kv_layer.py): the same keys and values as
transformers' concatenating `DynamicLayer` after any mix of decode steps and the running batch's
replacements, written without copying the cache on a plain step; and the decoding loop, which
runs on it, produces the same tokens as on `DynamicLayer`."""

from __future__ import annotations

import pytest
import torch
from test_prefix_cache import prompts_for, smol_tiny, smol_tokenizer, varied  # noqa: F401 fixtures
from transformers.cache_utils import DynamicLayer

from mcts.options import newline
from pipeline.lm import kv_layer
from pipeline.lm.generation import generate
from pipeline.lm.kv_layer import ROOM, RoomyLayer
from pipeline.lm.prefix_cache import PrefixCache, prefill


def _kv(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn((rows, 2, length, 4), generator=g) for _ in range(2))


def _same(a: DynamicLayer, b: DynamicLayer) -> None:
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_roomy_layer_holds_what_the_concatenating_layer_holds():
    """Prefill, decode steps past the spare room, and every replacement the running batch makes
    (rows selected, leading columns cut, a join's concatenation): the same tensors each time."""
    roomy, plain = RoomyLayer(), DynamicLayer()
    steps = iter(range(1000))

    def both(rows: int, length: int) -> None:
        k, v = _kv(rows, length, next(steps))
        out = roomy.update(k, v), plain.update(k, v)
        assert all(torch.equal(x, y) for x, y in zip(*out))
        _same(roomy, plain)

    both(3, 5)
    for _ in range(ROOM + 3):  # crosses the end of the first buffer
        both(3, 1)
    index = torch.tensor([2, 0])
    roomy.batch_select_indices(index), plain.batch_select_indices(index)
    both(2, 1)
    for layer in (roomy, plain):  # _trim: a view that starts past the buffer's front
        layer.keys, layer.values = layer.keys[..., 4:, :], layer.values[..., 4:, :]
    both(2, 1)
    joining = _kv(1, roomy.get_seq_length(), 99)
    for layer in (roomy, plain):  # join: a new, longer batch
        layer.keys = torch.cat([layer.keys, joining[0]])
        layer.values = torch.cat([layer.values, joining[1]])
    both(3, 1)
    both(3, 2)


def test_a_decode_step_writes_into_the_buffer_without_copying_the_cache():
    """The point of the layer: within its spare room a step leaves the cache where it was.
    `DynamicLayer` (the old behaviour) allocates a new tensor at every step."""
    layer, plain = RoomyLayer(), DynamicLayer()
    for x in (layer, plain):
        x.update(*_kv(2, 6, 0))
    where, plain_where = layer.keys.data_ptr(), plain.keys.data_ptr()
    for s in range(ROOM):
        layer.update(*_kv(2, 1, s + 1)), plain.update(*_kv(2, 1, s + 1))
        assert layer.keys.data_ptr() == where and layer.values.shape[-2] == 7 + s
    assert plain.keys.data_ptr() != plain_where
    layer.update(*_kv(2, 1, 50))  # past the room: moved once into a bigger buffer
    assert layer.keys.data_ptr() != where and layer.key_buffer.shape[-2] == 6 + ROOM + 1 + ROOM


def test_prefill_hands_the_decoding_loop_roomy_layers(request):
    model, tokenizer = request.getfixturevalue("varied")
    for store in (None, PrefixCache(16)):
        for _ in range(2):  # the second time past a cached prefix
            start = prefill(model, tokenizer, prompts_for(tokenizer), store)
            assert all(type(x) is RoomyLayer for x in start.cache.layers)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
def test_decoding_on_roomy_layers_gives_the_concatenating_layers_tokens(which, temperature, request,
                                                                        monkeypatch):
    """Rows join and leave a running batch of 3 and reuse the prefix cache: tokens and log-probs
    equal those decoded on transformers' own layer."""
    model, tokenizer = request.getfixturevalue(which)
    prompts = [p for p in prompts_for(tokenizer) for _ in range(2)]
    kwargs = dict(max_new_tokens=10, temperature=temperature, stop=newline(10), rollout_tokens=40,
                  rollout_temperature=temperature, seed=5, batch_size=3)
    roomy = generate(model, tokenizer, prompts, prefix_cache=PrefixCache(16), **kwargs)
    monkeypatch.setattr(kv_layer, "RoomyLayer", DynamicLayer)
    start = prefill(model, tokenizer, prompts[:1], None)
    assert all(type(x) is DynamicLayer for x in start.cache.layers)  # the patch took
    plain = generate(model, tokenizer, prompts, prefix_cache=PrefixCache(16), **kwargs)
    for a, b in zip(roomy, plain, strict=True):
        assert a.token_ids == b.token_ids and a.rollout_ids == b.rollout_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert (a.rollout_logprobs or []) == pytest.approx(b.rollout_logprobs or [], abs=1e-5)
    longest = max(len(g.token_ids) + len(g.rollout_ids or []) for g in roomy)
    assert longest > ROOM  # some row outgrew its first buffer
