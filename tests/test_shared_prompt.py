"""critics.shared_prompt: which texts share a prompt's pass, and how their completions batch."""

import functools
import warnings
from types import SimpleNamespace

import pytest
import torch
from test_prefix_cache import prompts_for, smol_tiny, smol_tokenizer, varied  # noqa: F401 fixtures
from transformers import DynamicCache, LlamaConfig

from critics import shared_prompt
from critics.shared_prompt import group_by_prompt


def test_texts_group_by_prompt_ids_and_the_rest_run_alone():
    pairs = [([1, 2], [5]), ([1, 2], [6, 7]), ([], [8]), ([3], [9]), ([1, 2], [0] * 10), ([1, 2], [])]
    groups, alone = group_by_prompt(pairs, max_length=8, min_group=2)
    assert groups == {(1, 2): [(0, [5]), (1, [6, 7]), (5, [])]}
    assert alone == [2, 3, 4]  # empty prompt, a prompt of its own, over max_length
    groups, alone = group_by_prompt(pairs)
    assert groups[(3,)] == [(3, [9])] and len(groups[(1, 2)]) == 4 and alone == [2]


def test_chunks_keep_every_row_once_and_bound_the_padding():
    lengths = [1, 1, 2, 3, 3, 3, 10, 11, 12, 40, 41, 80]
    rows = [(i, [0] * n) for i, n in enumerate(lengths)]
    chunks = list(shared_prompt.chunks(rows, batch_size=4))
    assert [r for c in chunks for r in c] == rows  # in order, each once
    for chunk in chunks:
        real, width = sum(len(ids) for _, ids in chunk), max(len(ids) for _, ids in chunk)
        assert len(chunk) <= 4 and len(chunk) * width <= 1.5 * real + 8
    assert len(chunks) < len(rows)  # rows of like length still share a forward


def test_with_cache_names_the_keyword_the_forward_takes(tiny_model):
    from critics.shared_prompt import returned_cache, with_cache

    class Old:
        def forward(self, input_ids=None, past_key_values=None):
            pass

    class New:
        def forward(self, input_ids=None, cache=None):
            pass

    assert with_cache(Old(), "kv") == {"past_key_values": "kv"}
    assert with_cache(New(), "kv") == {"cache": "kv"}
    model, _ = tiny_model  # the installed transformers takes it without a deprecation warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True,
                    **with_cache(model, DynamicCache(config=model.config)))
        step = model.base_model(input_ids=torch.tensor([[4]]), use_cache=True,
                                **with_cache(model.base_model, returned_cache(out)))
    assert returned_cache(step).get_seq_length() == 4


def test_a_token_tree_inputs_each_distinct_prefix_once():
    tree = shared_prompt.TokenTree()
    for i, ids in enumerate([[5, 6, 7], [5, 6], [5, 8], [5, 6, 7], [9], []]):
        tree.add(i, ids)
    # distinct prefixes: 5, 5 6, 5 6 7, 5 8, 9
    assert tree.tokens == [5, 6, 7, 8, 9]
    assert tree.parent == [shared_prompt.NO_PARENT, 0, 1, 0, shared_prompt.NO_PARENT]
    assert tree.depth == [0, 1, 2, 1, 0]
    assert [path for _, _, path in tree.rows] == [[0, 1, 2], [0, 1], [0, 3], [0, 1, 2], [4], []]
    assert tree.shared([5, 6, 9]) == 2 and tree.shared([1]) == 0
    seen = tree.visible()
    expected = torch.tensor([[1, 0, 0, 0, 0],  # 5 sees itself
                             [1, 1, 0, 0, 0],  # 6 sees 5
                             [1, 1, 1, 0, 0],  # 7 sees 5 6
                             [1, 0, 0, 1, 0],  # 8 sees 5, not its cousins
                             [0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(seen, expected)


def test_token_trees_keep_every_row_once_within_the_bounds():
    rows = [(i, ids) for i, ids in enumerate(
        [[1, 2, 3], [1, 2, 4], [1, 2], [7] * 12, [1, 5], [2, 2, 2], [1, 2, 3, 4]])]
    trees = list(shared_prompt.token_trees(rows, batch_size=3, budget=6))
    assert sorted(i for t in trees for i, _, _ in t.rows) == list(range(len(rows)))
    for tree in trees:
        assert len(tree.rows) <= 3
        assert len(tree.tokens) <= 6 or len(tree.rows) == 1  # a longer row alone
        for _, ids, path in tree.rows:
            assert [tree.tokens[k] for k in path] == ids
    # rows sharing a prefix land in one tree: [1 2] [1 2 3] [1 2 3 4] share 1 2 3
    first = trees[0]
    assert [ids for _, ids, _ in first.rows] == [[1, 2], [1, 2, 3], [1, 2, 3, 4]]
    assert len(first.tokens) == 4


def _tree_rows(tokenizer):
    """Completions as a search tree makes them: paths that extend each other, siblings that
    share a parent, a duplicate, a rollout past a node, a long row and an empty completion."""
    steps = ["12 + 5 = 17\n", "17 + 30 = 47\n", "17 + 3 = 20\n", "Answer: 47", "47 - 2 = 45\n\n"]
    texts = ["", steps[0], steps[0] + steps[1], steps[0] + steps[2], steps[0] + steps[1] + steps[3],
             steps[0] + steps[1], steps[0] + steps[4], steps[0] + steps[1] + "Answer: 4" + "7" * 30]
    return [(i, tokenizer(t, add_special_tokens=False).input_ids if t else [])
            for i, t in enumerate(texts)]


@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
@pytest.mark.parametrize("wide", [True, False])
def test_tree_attention_gives_each_completion_the_states_of_its_own_pass(which, wide, request,
                                                                         monkeypatch):
    """Tree attention against right-padded rows (one row per completion, the prompt's cache
    shared): the same states for every completion, with SmolLM2's real tokenizer too (BPE:
    "\\n\\n" is one token); a small budget cuts the rows into several trees."""
    model, tokenizer = request.getfixturevalue(which)
    assert shared_prompt.tree_attention_fits(model)
    prompt = tokenizer(prompts_for(tokenizer)[0], add_special_tokens=False).input_ids
    rows = _tree_rows(tokenizer)
    budget = 512 if wide else max(len(ids) for _, ids in rows) // 2
    monkeypatch.setattr(shared_prompt, "TREE_TOKENS", budget)
    trees = list(shared_prompt.token_trees(rows, 32, budget))
    if wide:  # one tree, which shares
        assert len(trees) == 1 and len(trees[0].tokens) < sum(len(ids) for _, ids in rows)
    else:
        assert len(trees) > 2
    head = shared_prompt.plain_lm_head(model)
    tree = {i: (ids, s, lp) for i, ids, s, lp
            in shared_prompt.completion_states(model, prompt, rows, 32, 0, lm_head=head)}
    monkeypatch.setattr(shared_prompt, "TREE_TOKENS", 0)
    assert not shared_prompt.tree_attention_fits(model)
    padded = {i: (ids, s, lp) for i, ids, s, lp
              in shared_prompt.completion_states(model, prompt, rows, 3, 0, lm_head=head)}
    assert sorted(tree) == sorted(padded) == [i for i, _ in rows]
    for i, ids in rows:
        assert tree[i][0] == padded[i][0] == ids
        assert tree[i][1].shape == (1 + len(ids), model.config.hidden_size)
        assert torch.allclose(tree[i][1], padded[i][1], atol=1e-4)
        # the log-probs by hand: each token's, from the state before it
        by_hand = torch.log_softmax(head(tree[i][1][:-1]).float(), -1)[range(len(ids)), ids]
        assert tree[i][2].shape == (len(ids),)
        assert torch.allclose(tree[i][2], by_hand, atol=1e-4)
        assert torch.allclose(padded[i][2], by_hand, atol=1e-4)


@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
def test_a_token_tree_projects_each_distinct_prefix_to_the_vocabulary_once(which, request):
    """Rows that share completion prefixes (a node's text is its parent's plus an option): the
    LM head sees one row per tree token, not one per token of every row, and without a head
    no log-probs are read (SmolLM2's BPE too)."""
    model, tokenizer = request.getfixturevalue(which)
    prompt = tokenizer(prompts_for(tokenizer)[0], add_special_tokens=False).input_ids
    rows = _tree_rows(tokenizer)
    (tree,) = shared_prompt.token_trees(rows, 32, shared_prompt.TREE_TOKENS)
    head, projected = shared_prompt.plain_lm_head(model), []
    hook = head.register_forward_hook(lambda _m, args, _o: projected.append(args[0].shape[0]))
    try:
        found = list(shared_prompt.completion_states(model, prompt, rows, 32, 0, lm_head=head))
        plain = list(shared_prompt.completion_states(model, prompt, rows, 32, 0))
    finally:
        hook.remove()
    assert sum(projected) == len(tree.tokens) < sum(len(ids) for _, ids in rows)
    assert [len(lp) for *_, lp in found] == [len(ids) for _, ids, *_ in found]
    assert all(lp is None for *_, lp in plain)


def test_tree_attention_needs_full_attention_layers_and_a_custom_mask():
    """A sliding window or flash attention (no custom 4D mask): completion_states runs the
    right-padded rows instead; a sliding window's KV is not shared as a common prompt prefix."""
    from transformers import MistralConfig

    small = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2)
    windowed = SimpleNamespace(config=MistralConfig(sliding_window=4, **small))
    windowed.config._attn_implementation = "sdpa"
    assert not shared_prompt.tree_attention_fits(windowed)
    plain = SimpleNamespace(config=LlamaConfig(**small))
    plain.config._attn_implementation = "flash_attention_2"  # takes no custom 4D mask
    assert not shared_prompt.tree_attention_fits(plain)
    plain.config._attn_implementation = "sdpa"
    assert shared_prompt.tree_attention_fits(plain)
    prompts = [[1] * 20 + [2], [1] * 20 + [3]]  # 20 tokens in common: shareable, unless windowed
    assert shared_prompt.shareable_prefix_length(plain, prompts) == 20
    assert shared_prompt.shareable_prefix_length(windowed, prompts) == 0


def test_common_prefix_length_leaves_each_prompt_a_token():
    length = shared_prompt.common_prefix_length
    assert length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert length([(1, 2), (1, 2, 3)]) == 1  # (1, 2) keeps its last token to run
    assert length([[1, 2, 3]]) == 0 and length([[4, 5], [6, 5]]) == 0


@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
def test_grouped_states_run_the_prompts_common_prefix_once(which, request, monkeypatch):
    """Prompt groups that open alike (a task's instruction and worked example): the prefix
    runs once, each prompt past it, and every completion's states equal those of a prompt run
    whole (SmolLM2's BPE too); a prefix under MIN_SHARED tokens is not run on its own."""
    from test_prefix_cache import few_shot_prompts

    model, tokenizer = request.getfixturevalue(which)
    prompts = [tuple(tokenizer(p, add_special_tokens=False).input_ids)
               for p in few_shot_prompts(tokenizer)[:3]]
    rows = _tree_rows(tokenizer)
    groups = {p: [(10 * g + i, ids) for i, ids in rows] for g, p in enumerate(prompts)}
    prefix = shared_prompt.shared_prefix(model, list(groups))
    k = shared_prompt.common_prefix_length(prompts)
    assert prefix is not None and prefix.ids == list(prompts[0][:k]) and k >= shared_prompt.MIN_SHARED
    assert all(prefix.opens(p) for p in prompts) and not prefix.opens(prompts[0][:k])
    unmasked = []  # tokens of each forward without an attention mask: the prefix and prompts
    base_forward = type(model.base_model).forward

    @functools.wraps(base_forward)
    def counted(self, *args, **kwargs):
        if kwargs.get("attention_mask") is None:
            unmasked.append(kwargs["input_ids"].shape[1])
        return base_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model.base_model), "forward", counted)
    together = {i: s for i, _, s, _ in shared_prompt.grouped_states(model, groups, 32, 0)}
    assert unmasked == [k] + [len(p) - k for p in prompts]
    monkeypatch.undo()
    whole = {i: s for p, group in groups.items()
             for i, _, s, _ in shared_prompt.completion_states(model, list(p), group, 32, 0)}
    assert sorted(together) == sorted(whole) == sorted(i for g in groups.values() for i, _ in g)
    for i in whole:
        assert torch.allclose(together[i], whole[i], atol=1e-4)
    monkeypatch.setattr(shared_prompt, "MIN_SHARED", k + 1)
    assert shared_prompt.shared_prefix(model, list(groups)) is None
