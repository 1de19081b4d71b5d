"""One forward of a prompt for all the completions that share it.

A tree's nodes and rollouts all share one prompt, and so do a problem's best-of-N samples and
a node's sibling options. Run per text, the prompt is re-run once per completion; here it runs
once and its KV cache serves up to `batch_size` completions per forward, right-padded, with
positions that continue the prompt's: each completion sees exactly what a pass of its own would.
Critic features (critics.features) and teacher-forced log-probs (pipeline.lm.teacher_forced)
both read their hidden states from here.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Iterator, Sequence

import torch

Pair = tuple[list[int], list[int]]  # (prompt ids, completion ids)
Row = tuple[int, list[int]]  # (index into the caller's texts, completion ids)


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@functools.cache
def _cache_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(module, cache) -> dict:
    """The KV cache as `module`'s forward takes it: `cache=` since transformers renamed it (the
    old `past_key_values=` warns and goes in 5.40), `past_key_values=` in older versions."""
    return {_cache_keyword(type(module).forward): cache}


def returned_cache(output):
    """The KV cache a forward returned (`output.cache`; `past_key_values` before the rename)."""
    return output.cache if "cache" in output else output.past_key_values


def plain_lm_head(model):
    """The output embedding when logits are exactly lm_head(final hidden state), so that
    log-probs can be read from completion_states; None for a model without one, or one that
    scales or soft-caps its logits (Gemma 2, Cohere, Granite), which must run whole."""
    head = model.get_output_embeddings()
    scaled = any(getattr(model.config, key, None) not in (None, 1, 1.0)
                 for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return None if scaled else head


def group_by_prompt(pairs: Sequence[Pair], max_length: int | None = None,
                    min_group: int = 1) -> tuple[dict[tuple[int, ...], list[Row]], list[int]]:
    """The pairs that share a prompt, by prompt ids (groups of at least `min_group` rows), and
    the indices of the rest, which run alone: an empty prompt, a text over `max_length` tokens,
    or a smaller group."""
    groups: dict[tuple[int, ...], list[Row]] = {}
    alone = []
    for i, (prompt_ids, completion_ids) in enumerate(pairs):
        if prompt_ids and (max_length is None or len(prompt_ids) + len(completion_ids) <= max_length):
            groups.setdefault(tuple(prompt_ids), []).append((i, list(completion_ids)))
        else:
            alone.append(i)
    for key in [k for k, rows in groups.items() if len(rows) < min_group]:
        alone.extend(i for i, _ in groups.pop(key))
    return groups, sorted(alone)


@torch.no_grad()
def completion_states(model, prompt_ids: list[int], rows: Sequence[Row], batch_size: int,
                      pad: int) -> Iterator[tuple[int, list[int], torch.Tensor]]:
    """Per row sharing `prompt_ids`: (index, completion ids, states), where states is
    (1 + len(ids), hidden): the final hidden state at the prompt's last token, then at each
    completion token. states[k] predicts completion token k. Rows come back shortest first."""
    base, device = model.base_model, model.device
    first = base(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    prompt_state = first.last_hidden_state[0, -1:]
    size = len(prompt_ids)
    for chunk in chunks(sorted(rows, key=lambda row: len(row[1])), batch_size):
        width = max(len(ids) for _, ids in chunk)
        hidden = None
        if width:
            cache = copy.deepcopy(returned_cache(first))
            cache.batch_repeat_interleave(len(chunk))
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for _, ids in chunk], device=device)
            mask = torch.tensor([[1] * (size + len(ids)) + [0] * (width - len(ids)) for _, ids in chunk],
                                device=device)
            positions = torch.arange(size, size + width, device=device).expand(len(chunk), width)
            hidden = base(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, **with_cache(base, cache)).last_hidden_state
        for j, (i, ids) in enumerate(chunk):
            yield i, ids, torch.cat([prompt_state, hidden[j, :len(ids)]]) if ids else prompt_state


def chunks(rows: list[Row], batch_size: int, waste: float = 1.5) -> Iterator[list[Row]]:
    """Rows sorted by length, cut into batches of at most `batch_size` whose right padding
    keeps the tokens run within `waste` times their real tokens (plus a few)."""
    chunk, real = [], 0
    for row in rows:
        width = len(row[1])  # the longest so far: rows come sorted
        if chunk and (len(chunk) == batch_size or (len(chunk) + 1) * width > waste * (real + width) + 8):
            yield chunk
            chunk, real = [], 0
        chunk.append(row)
        real += len(row[1])
    if chunk:
        yield chunk
