"""Teacher-forced log-probs of given continuations: the implicit DPO reward (log pi - log pi_ref),
DPO's pair metrics, the critics' shared-prompt passes and credit maps. Generation
(pipeline/lm/generation.py) records its own tokens' log-probs as it samples; these score text or
token ids that are already there."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from critics.shared_prompt import group_by_prompt, grouped_states, pad_id, plain_lm_head
from pipeline.lm.trunk import Trunk, replaying_passes

LOGITS_MB = 256  # float32 logits (and their log-softmax) one forward may hold; rows are chunked


@torch.no_grad()
def completion_logprobs(model, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                        batch_size: int = 16, tap=None) -> list[list[float]]:
    """Teacher-forced per-token log-probs of each completion (text, tokenized apart from its
    prompt) after its prompt. Used by the implicit DPO reward (log pi - log pi_ref) and by beam
    scoring. `tap`: as tail_logprobs takes it."""
    pairs = [(tokenizer(p, add_special_tokens=False).input_ids,
              tokenizer(c, add_special_tokens=False).input_ids) for p, c in zip(prompts, completions)]
    return tail_logprobs(model, tokenizer, pairs, batch_size, tap)


def trunk_logprobs(model, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                   batch_size: int = 16, *, trunk: Trunk | None = None) -> list[list[float]]:
    """completion_logprobs, each forward starting above `trunk` (pipeline.lm.trunk) where
    `model` computes its states and the trunk holds every text; else whole."""
    with replaying_passes(model, trunk) as tap:
        return completion_logprobs(model, tokenizer, prompts, completions, batch_size, tap)


@torch.no_grad()
def token_logprobs(model, tokenizer, prompts: Sequence[str], token_ids: Sequence[Sequence[int]],
                   batch_size: int = 16) -> list[list[float]]:
    """Teacher-forced log-probs of given token ids after each (text) prompt: the exact tokens a
    `generate` call produced (its `Generation.token_ids`), not a re-tokenization of their text,
    which can differ at BPE boundaries (a generated "\\n" "\\n" re-tokenizes as one "\\n\\n")."""
    if len(prompts) != len(token_ids):
        raise ValueError(f"{len(prompts)} prompts for {len(token_ids)} token id lists")
    pairs = [(tokenizer(p, add_special_tokens=False).input_ids, list(ids))
             for p, ids in zip(prompts, token_ids)]
    return tail_logprobs(model, tokenizer, pairs, batch_size)


def tail_logprobs(model, tokenizer, pairs: list[tuple[list[int], list[int]]],
                  batch_size: int, tap=None) -> list[list[float]]:
    """Per (prompt ids, completion ids): the completion tokens' log-probs. Completions that share
    a prompt (a problem's samples, a node's sibling options) run it once, and the prefix all
    those prompts open with once for all of them (critics.shared_prompt); the rest run in
    left-padded batches. `tap` (pipeline.lm.trunk): files the grouped rows' trunk states, or replays them."""
    lm_head = plain_lm_head(model)
    groups, alone = group_by_prompt(pairs, min_group=2)
    if lm_head is None:  # scaled or soft-capped logits: each text runs whole
        groups, alone = {}, list(range(len(pairs)))
    if tap is not None and not tap.covers([pairs[i] for rows in groups.values() for i, _ in rows]):
        tap = None  # the pass's forwards share KV caches: replay all of them or none
    results: list[list[float] | None] = [None] * len(pairs)
    for i, _, _, logps in grouped_states(model, groups, batch_size, pad_id(tokenizer), lm_head,
                                           tap):
        results[i] = logps.tolist()
    for i, found in zip(alone, _left_padded(model, tokenizer, [pairs[i] for i in alone], batch_size)):
        results[i] = found
    return results


def _left_padded(model, tokenizer, pairs: list[tuple[list[int], list[int]]],
                 batch_size: int) -> list[list[float]]:
    """One left-padded forward per batch (position ids count real tokens, as in generation), and
    logits only at the completions' positions, in row chunks whose logits fit LOGITS_MB: a
    full-vocabulary logit tensor over every position (32 rows x 384 tokens x 49k vocabulary:
    2.4 GB, twice with its log-softmax) is what the memory peak of the refit stage used to be."""
    pad = pad_id(tokenizer)
    results: list[list[float]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        tail = max(len(c) for _, c in chunk)
        if tail == 0:
            results.extend([] for _ in chunk)
            continue
        rows = max(1, LOGITS_MB * 2**20 // (2 * 4 * (tail + 1) * model.config.vocab_size))
        for sub in range(0, len(chunk), rows):
            results.extend(_forward_tail(model, chunk[sub:sub + rows], tail, pad))
    return results


def _forward_tail(model, chunk: list[tuple[list[int], list[int]]], tail: int,
                  pad: int) -> list[list[float]]:
    seqs = [p + c for p, c in chunk]
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=model.device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=model.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = min(tail + 1, width)  # logits at the last `keep` positions predict the tail
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=keep).logits[:, :-1].float()
    picked = torch.log_softmax(logits, dim=-1).gather(2, input_ids[:, width - keep + 1:, None])
    picked = picked.squeeze(2).cpu()
    return [picked[row, picked.shape[1] - len(c):].tolist() if c else []
            for row, (_, c) in enumerate(chunk)]
