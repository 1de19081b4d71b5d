"""pipeline.lm.prefix_cache: one prefill per distinct prompt, KV reuse across generate calls.

The radix tree is tested on synthetic KV whose values name their token and position; the
equal-outputs property (reuse on == reuse off, greedy and sampled at the same seeds) on the
`varied` tiny model (char tokenizer) and on a tiny model with SmolLM2's real BPE tokenizer,
where tokenize(prefix + option) can differ from the generated ids at the seam.
"""

import os
import random
from pathlib import Path

import pytest
import torch

from mcts.options import newline, sentence_end
from pipeline.compose import compose_config
from pipeline.config import ModelConfig
from pipeline.decoding.tree_search import SearchModels, eval_search
from pipeline.lm.generation import chat_prompt, generate
from pipeline.lm.models import embedded_gguf, load_model
from pipeline.lm.prefix_cache import PrefixCache, prefill
from pipeline.lm.stopping import Row, extend_text
from pipeline.stages.search import kv_summary

QUESTIONS = ["What is 2+3?", "Hi", "Compute 17*3 then add 4.", "x", "Name three primes."]


def fake_kv(tokens, start=0):
    """(layers=2, 2, heads=1, len, dim=2): value = token id, second channel = position."""
    t = torch.tensor(tokens[start:], dtype=torch.float32)
    pos = torch.arange(start, len(tokens), dtype=torch.float32)
    one = torch.stack([t, pos], dim=-1)[None]  # (1, len, 2)
    return torch.stack([torch.stack([one, one + 0.5])] * 2)


def insert(cache, tokens, asked=None):
    def kv_from(start):
        if asked is not None:
            asked.append(start)
        return fake_kv(tokens, start)

    cache.insert(tokens, kv_from)


# ---------------------------------------------------------------- the radix tree


def test_lookup_returns_longest_prefix_kv_and_keeps_one_token_to_run():
    cache = PrefixCache(max_mb=1)
    insert(cache, [1, 2, 3, 4, 5])
    insert(cache, [1, 2, 9, 9])
    for query, expect in [([1, 2, 3, 4, 5, 6], 5), ([1, 2, 3, 7], 3), ([1, 2, 9, 9, 1], 4),
                          ([1, 2, 3, 4, 5], 4), ([8, 1, 2], 0), ([1, 2], 1)]:
        m, kv = cache.lookup(query)
        assert m == expect, query
        if m:
            assert torch.equal(kv, fake_kv(query[:m])), query  # exact tokens and positions
        else:
            assert kv is None


def test_insert_stores_only_new_tokens_and_splits_segments():
    cache = PrefixCache(max_mb=1)
    asked = []
    insert(cache, [1, 2, 3, 4], asked)
    insert(cache, [1, 2, 3, 4, 5, 6], asked)  # extends: only 5, 6 are new
    insert(cache, [1, 2, 7], asked)  # diverges inside the first segment: split at 2
    insert(cache, [1, 2, 3], asked)  # already covered: nothing asked
    assert asked == [0, 4, 2]
    assert cache.stats.stored_tokens == 4 + 2 + 1
    per_token = fake_kv([0]).numel() * 4
    assert cache.stats.bytes == 7 * per_token
    root = cache.root
    assert list(root.children) == [1] and root.children[1].tokens == (1, 2)
    assert sorted(root.children[1].children) == [3, 7]
    for q in ([1, 2, 3, 4, 5, 6, 0], [1, 2, 7, 0]):
        m, kv = cache.lookup(q)
        assert m == len(q) - 1 and torch.equal(kv, fake_kv(q[:-1]))


def test_lru_evicts_leaves_first_within_the_byte_bound():
    per_token = fake_kv([0]).numel() * 4
    cache = PrefixCache(max_mb=10 * per_token / 2**20)  # room for 10 tokens
    insert(cache, [1, 2, 3, 4])  # a shared stem, then two branches
    insert(cache, [1, 2, 3, 4, 5, 6])
    insert(cache, [1, 2, 3, 4, 7, 8])
    assert cache.stats.bytes == 8 * per_token
    cache.lookup([1, 2, 3, 4, 5, 6, 0])  # touch the 5-6 branch: 7-8 is now least recent
    insert(cache, [9, 9, 9])  # 11 tokens > 10: evict the oldest leaf first, then insert
    assert cache.lookup([1, 2, 3, 4, 7, 8, 0])[0] == 4  # its branch is gone, the stem stays
    assert cache.lookup([1, 2, 3, 4, 5, 6, 0])[0] == 6
    assert cache.stats.bytes == 9 * per_token <= cache.capacity
    assert cache.stats.peak_bytes == 9 * per_token and cache.stats.evicted_tokens == 2  # never over
    insert(cache, [5] * 9)  # forces out everything older, stem last
    assert cache.lookup([1, 2, 3, 4, 5, 6, 0])[0] == 0 and cache.stats.bytes <= cache.capacity
    # every cached node is reachable from the root (nothing orphaned)
    seen, stack = 0, list(cache.root.children.values())
    while stack:
        node = stack.pop()
        seen += 1
        stack.extend(node.children.values())
    assert seen == len(cache.lru)


def test_a_suffix_with_no_room_beside_its_prefix_is_not_cached():
    per_token = fake_kv([0]).numel() * 4
    cache = PrefixCache(max_mb=6 * per_token / 2**20)  # room for 6 tokens
    insert(cache, [1, 2, 3, 4])
    insert(cache, [1, 2, 3, 4, 5, 6, 7])  # 3 more would need its own prefix evicted
    assert cache.lookup([1, 2, 3, 4, 5, 6, 7, 0])[0] == 4 and cache.stats.bytes == 4 * per_token
    insert(cache, [8] * 7)  # bigger than the cache: not cached, and nothing evicted for it
    assert cache.lookup([8] * 8)[0] == 0 and cache.stats.evicted_tokens == 0
    assert cache.lookup([1, 2, 3, 4, 0])[0] == 4 and cache.stats.peak_bytes <= cache.capacity


def test_zero_capacity_stores_nothing():
    cache = PrefixCache(max_mb=0)
    insert(cache, [1, 2, 3])
    assert not cache.enabled and cache.lookup([1, 2, 3, 4]) == (0, None)
    assert cache.stats.bytes == 0 and not cache.lru


# ---------------------------------------------------------------- prefill on a model


@pytest.fixture(scope="module")
def varied(tmp_path_factory):
    """A random Llama whose greedy text varies by prompt (as in test_generation)."""
    from tiny import tiny_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    return _random_llama(tmp_path_factory.mktemp("varied") / "model", tokenizer, LlamaConfig,
                         LlamaForCausalLM)


def _random_llama(path: Path, tokenizer, config_cls, model_cls):
    config = config_cls(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, initializer_range=0.3,
    )
    torch.manual_seed(1)
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_model(ModelConfig(name=str(path)))


@pytest.fixture(scope="module")
def smol_tokenizer():
    """SmolLM2's real tokenizer, read from the embedded GGUF once and kept in ~/.cache/qstar."""
    from transformers import AutoTokenizer

    saved = Path("~/.cache/qstar/tokenizers/smollm2-135m").expanduser()
    if not (saved / "tokenizer_config.json").is_file():
        gguf = embedded_gguf("smollm2-135m")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(saved)
    tokenizer = AutoTokenizer.from_pretrained(saved)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="module")
def smol_tiny(tmp_path_factory, smol_tokenizer):
    """A 2-layer random Llama over SmolLM2's 49152-token vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _random_llama(tmp_path_factory.mktemp("smol") / "model", smol_tokenizer, LlamaConfig,
                         LlamaForCausalLM)


def prompts_for(tokenizer):
    return [chat_prompt(tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]


def test_prefill_logits_same_with_cached_prefix_and_shared_rows(varied):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    rows = [p for p in prompts for _ in range(3)] + [prompts[0] + "Step 1\n", prompts[1] + "a b"]
    fresh = prefill(model, tokenizer, rows, None)
    store = PrefixCache(max_mb=16)
    generate(model, tokenizer, prompts, max_new_tokens=6, prefix_cache=store)  # fills the cache
    before = store.stats.prompt_tokens
    cached = prefill(model, tokenizer, rows, store)
    assert store.stats.lookups >= len(set(rows)) and store.stats.reused_tokens > 0
    distinct = sum(len(tokenizer(p).input_ids) for p in set(rows))
    assert store.stats.prompt_tokens - before == distinct  # each distinct prompt counted once
    assert cached.logits.shape == fresh.logits.shape == (len(rows), len(tokenizer))
    assert torch.allclose(cached.logits, fresh.logits, atol=1e-5)
    assert cached.prompt_ids == fresh.prompt_ids
    assert (cached.mask.sum(-1) == fresh.mask.sum(-1)).all()  # same real tokens per row


def test_one_prefill_per_distinct_prompt(varied):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)[:2]
    store = PrefixCache(max_mb=0)  # counting only
    generate(model, tokenizer, [p for p in prompts for _ in range(4)], max_new_tokens=3,
             prefix_cache=store)
    lengths = [len(tokenizer(p).input_ids) for p in prompts]
    assert store.stats.row_prompt_tokens == 4 * sum(lengths)
    assert store.stats.prefill_tokens == store.stats.prompt_tokens == sum(lengths)
    assert store.stats.reused_tokens == 0 and store.stats.bytes == 0


# ---------------------------------------------------------------- equal outputs, on vs off


def _two_levels(model, tokenizer, prompts, store, temperature, stop, rollout):
    """A root expansion, then the children's: what tree search asks of generate."""
    kwargs = dict(max_new_tokens=8, temperature=temperature, stop=stop, rollout_tokens=rollout,
                  batch_size=6, prefix_cache=store)
    first = generate(model, tokenizer, [p for p in prompts for _ in range(3)], seed=7, **kwargs)
    children = [p + g.text for p, g in zip([p for p in prompts for _ in range(3)], first)]
    second = generate(model, tokenizer, [c for c in children for _ in range(2)], seed=8, **kwargs)
    return first + second


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("stop,rollout", [(newline(8), 6), (sentence_end(8), 0)])
def test_reuse_on_and_off_give_identical_tokens(varied, temperature, stop, rollout):
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)
    off = _two_levels(model, tokenizer, prompts, PrefixCache(0), temperature, stop, rollout)
    store = PrefixCache(16)
    on = _two_levels(model, tokenizer, prompts, store, temperature, stop, rollout)
    assert store.stats.hit_rate > 0.5  # the children's prompts came mostly from the cache
    for a, b in zip(off, on):
        assert a.token_ids == b.token_ids and a.text == b.text and a.rollout == b.rollout
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        assert (a.rollout_logprobs or []) == pytest.approx(b.rollout_logprobs or [], abs=1e-4)
    assert len({g.text for g in on}) > 2  # not vacuous: the rows differ


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_reuse_with_smollm2_tokenizer_respects_the_bpe_seam(smol_tiny, temperature):
    model, tokenizer = smol_tiny
    prompts = prompts_for(tokenizer)[:3]
    store = PrefixCache(64)
    kwargs = dict(max_new_tokens=6, temperature=temperature, stop=newline(6), rollout_tokens=4,
                  seed=3)
    first = generate(model, tokenizer, [p for p in prompts for _ in range(2)], prefix_cache=store,
                     **kwargs)
    # Children as tree search writes them (text), plus seams that BPE merges: "ab" + "c" is one
    # token, so the cached ids of the prompt + "ab" are not a prefix of tokenize(prompt + "abc").
    children = [p + g.text for p, g in zip([p for p in prompts for _ in range(2)], first)]
    merged = prompts[0] + "ab"
    assert tokenizer(merged + "c").input_ids[:-1] != tokenizer(merged).input_ids
    generate(model, tokenizer, [merged], max_new_tokens=3, prefix_cache=store)
    seam = merged + "c"
    m, _ = store.match(tokenizer(seam).input_ids)
    assert m < len(tokenizer(merged).input_ids)  # the match stops before the merged token
    asked = children + [seam, seam + " is"]
    on = generate(model, tokenizer, asked, prefix_cache=store, **kwargs)
    off = generate(model, tokenizer, asked, prefix_cache=PrefixCache(0), **kwargs)
    assert store.stats.reused_tokens > 0
    for a, b in zip(off, on):
        assert a.token_ids == b.token_ids and a.rollout == b.rollout
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def test_eval_search_trees_identical_with_reuse_on_and_off(varied, tmp_path):
    """Whole MCTS searches (sampled options, fused rollouts, merges) at the same seed."""
    model, tokenizer = varied
    prompts = prompts_for(tokenizer)[:3]

    def run(mb):
        cfg = compose_config(["debug=default", f"model.cache_dir={tmp_path}",
                              f"search.kv_cache_mb={mb}", "search.simulations=6"])
        trees, scorer = eval_search(prompts, cfg, SearchModels(model, tokenizer))
        return [[(t.text[n], t.num_tokens[n]) for n in range(t.num_nodes)] for t in trees], scorer

    off, off_scorer = run(0)
    on, on_scorer = run(32)
    assert on == off
    assert sum(len(t) for t in on) > 2 * len(prompts)  # the trees grew past their roots
    assert off_scorer.kv.stats.reused_tokens == 0
    assert on_scorer.kv.stats.hit_rate > 0.3
    assert on_scorer.kv.stats.prefill_tokens < off_scorer.kv.stats.prefill_tokens / 2


@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
def test_the_roots_rollouts_leave_their_prompts_to_the_first_expansion(which, request, tmp_path):
    """Each root's fast rollout runs through the search's KV cache, so the root's first
    expansion prefills one token of its prompt (the one whose logits start decoding)."""
    model, tokenizer = request.getfixturevalue(which)
    prompts = prompts_for(tokenizer)[:3]
    cfg = compose_config(["debug=default", f"model.cache_dir={tmp_path}", "search.kv_cache_mb=32",
                          "search.simulations=1", "search.merge_retries=0"])
    _, scorer = eval_search(prompts, cfg, SearchModels(model, tokenizer))
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    assert scorer.kv.stats.reused_tokens >= sum(n - 1 for n in lengths)
    assert scorer.kv.stats.hits >= len(prompts)


# ---------------------------------------------------------------- incremental text


def test_incremental_text_equals_whole_decode_with_smollm2_tokenizer(smol_tokenizer):
    tokenizer = smol_tokenizer
    texts = ["The sum is 5.\n\nSo 3 + 4 = 7.", "Café: naïve 北京 🙂 ok", " leading  spaces\tand\n"]
    rng = random.Random(0)
    sequences = [tokenizer(t).input_ids for t in texts]
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(40)] for _ in range(5)]
    sequences.append(tokenizer("🙂🙂").input_ids + [tokenizer.eos_token_id] + [33, 198])
    for ids in sequences:
        row = Row([], [])
        for token in ids:
            row.tokens.append(token)
            extend_text(tokenizer, row)
            whole = tokenizer.decode(row.tokens, skip_special_tokens=True)
            assert whole.startswith(row.text)
            if not whole.endswith("\ufffd"):
                assert row.text == whole  # complete characters: exactly the whole decode


def test_search_stage_kv_summary_weights_shards_by_tokens():
    a = dict(PrefixCache(0).stats.as_dict(), prompt_tokens=100, reused_tokens=90,
             prefill_tokens=10, peak_mb=5.0)
    b = dict(a, prompt_tokens=300, reused_tokens=30, prefill_tokens=270, peak_mb=7.5)
    assert kv_summary([a, b]) == {"kv_hit_rate": 0.3, "kv_peak_mb": 7.5, "prefill_tokens": 280}
    assert kv_summary([]) == {}  # every shard was already on disk


# ---------------------------------------------------------------- a prefix common to the prompts

FEW_SHOT = ("Add or subtract one number at a time, one partial result per line.\n"
            "Compute 12 + 34 - 5.\n12 + 34 = 46\n46 - 5 = 41\nAnswer: 41\n")


def few_shot_prompts(tokenizer) -> list[str]:
    """Prompts that open alike (an instruction and a worked example), as a task's do."""
    return [chat_prompt(tokenizer, [{"role": "system", "content": FEW_SHOT},
                                    {"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
@pytest.mark.parametrize("with_store", [True, False])
def test_a_prefix_common_to_the_prompts_runs_once_and_changes_no_output(
        which, temperature, with_store, request, monkeypatch):
    """The prompts' common prefix is run once per prefill call (and cached), each prompt only
    past it: tokens, log-probs and hidden states equal those with it off (with SmolLM2's BPE
    too), rows joining a running batch included, with or without a PrefixCache."""
    from critics import shared_prompt

    model, tokenizer = request.getfixturevalue(which)
    prompts = [p for p in few_shot_prompts(tokenizer) for _ in range(2)]
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in dict.fromkeys(prompts)]
    k = len(os.path.commonprefix(ids))
    assert k >= shared_prompt.MIN_SHARED and k < min(len(x) for x in ids)
    kwargs = dict(max_new_tokens=8, temperature=temperature, stop=newline(8), rollout_tokens=6,
                  rollout_temperature=temperature, hidden=True, seed=5, batch_size=4)
    monkeypatch.setattr(shared_prompt, "MIN_SHARED", 10**9)
    off = generate(model, tokenizer, prompts, **kwargs)
    monkeypatch.undo()
    store = PrefixCache(16) if with_store else None
    on = generate(model, tokenizer, prompts, prefix_cache=store, **kwargs)
    for a, b in zip(off, on, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text and a.rollout == b.rollout
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        for h in ("prompt_hidden", "option_hidden", "end_hidden"):
            assert torch.allclose(getattr(a, h), getattr(b, h), atol=1e-4)
    assert len({g.text + g.rollout for g in on}) > 2  # not vacuous: the rows differ
    if with_store:
        assert store.stats.shared_tokens > 0


def test_the_shared_prefix_is_prefilled_once_counted_by_hand(varied):
    """One prefill call: the common prefix's k tokens run once, then each distinct prompt's
    tokens past it; a second call finds the prefix in the store."""
    model, tokenizer = varied
    prompts = few_shot_prompts(tokenizer)
    ids = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    k = len(os.path.commonprefix(ids))
    store = PrefixCache(16)
    fresh = prefill(model, tokenizer, prompts, None)
    found = prefill(model, tokenizer, prompts, store)
    assert torch.allclose(found.logits, fresh.logits, atol=1e-5)
    s = store.stats
    assert s.prefill_tokens == k + sum(len(x) - k for x in ids)
    assert s.shared_tokens == k * len(ids) and s.reused_tokens == 0 and s.stored_tokens == k
    again = prefill(model, tokenizer, prompts[::-1], store)
    assert torch.allclose(again.logits, fresh.logits.flip(0), atol=1e-5)
    assert s.reused_tokens == k * len(ids)  # from the store: the prefix did not run again
    assert s.prefill_tokens == k + 2 * sum(len(x) - k for x in ids)
