"""critics.shared_prompt: which texts share a prompt's pass, and how their completions batch."""

import warnings

import torch
from transformers import DynamicCache

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
