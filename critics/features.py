"""Critic features: one backbone pass per (prompt, completion), shared by every head (texts
with one prompt share its pass).

Three features come out of the same pass:
- hidden: the backbone's final hidden state (after the final norm) at the last token; the
  heads read it with `critics.state_features=hidden` (value, PRM) or `orm_features=hidden`.
- prompt_hidden: the same at the prompt's last token: what the backbone makes of the problem.
- logprob: how sure the backbone LM is of the completion, token by token: the mean, minimum
  and sum of the completion tokens' log-probabilities and their count.
The default heads (`critics.orm_features=confidence`, `state_features=confidence`) read
logprob and prompt_hidden: hidden states separate problems from each other well but right
from wrong answers *to one problem* poorly, which is what best-of-N and search need (measured
in benchmarks/RESULTS.md, "What the ORM reads").

We call the model's base (`model.base_model`: the decoder inside a causal LM, or an `AutoModel`
itself) and project to the vocabulary only at the completion's positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from critics.shared_prompt import group_by_prompt, grouped_states, pad_id, picked_logprobs

LOGPROB_STATS = ("mean", "min", "sum", "tokens")


@dataclass
class Features:
    hidden: torch.Tensor  # (n, hidden_size) float32, CPU
    prompt_hidden: torch.Tensor  # (n, hidden_size) float32, CPU
    logprob: torch.Tensor | None  # (n, len(LOGPROB_STATS)) float32, CPU; None when not asked for


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (batch, width), left padded
    attention_mask: torch.Tensor  # (batch, width)
    position_ids: torch.Tensor  # (batch, width)
    completion_tokens: list[int]  # per row: completion tokens kept that a previous token predicts


def encode_left_padded(tokenizer, prompts: Sequence[str], completions: Sequence[str],
                       max_length: int) -> Encoded:
    """Prompt and completion tokenized apart (as generation saw them), joined and left padded;
    long texts keep their tail, where the newest step and the answer are."""
    rows, counts = [], []
    for prompt, completion in zip(prompts, completions, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        completion_ids = tokenizer(completion, add_special_tokens=False).input_ids if completion else []
        ids = (prompt_ids + completion_ids)[-max_length:]
        if not ids:
            raise ValueError("a critic text tokenizes to nothing; texts include the prompt")
        rows.append(ids)
        counts.append(min(len(completion_ids), len(ids) - 1))  # the first token has no predictor
    width = max(len(i) for i in rows)
    pad = pad_id(tokenizer)
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in rows])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in rows])
    # Positions count real tokens only, so a padded row sees what it would see alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Encoded(input_ids, mask, positions, counts)


def _logprob_stats(logp: torch.Tensor) -> torch.Tensor:
    """LOGPROB_STATS of a completion's token log-probs `logp` (c,). No tokens: all zeros."""
    if len(logp) == 0:
        return torch.zeros(len(LOGPROB_STATS))
    stats = torch.stack([logp.mean(), logp.min(), logp.sum()]).cpu()  # the model may be on a GPU
    return torch.cat([stats, torch.tensor([float(len(logp))])])


@dataclass
class _Rows:
    """Per text, the three features once computed."""

    hidden: list
    prompt: list
    logprob: list

    def put(self, i: int, hidden: torch.Tensor, prompt: torch.Tensor, logprob: torch.Tensor | None):
        self.hidden[i], self.prompt[i] = hidden.float().cpu(), prompt.float().cpu()
        self.logprob[i] = logprob


@torch.no_grad()
def backbone_features(model, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                      batch_size: int, max_length: int, logprobs: bool = False,
                      tap=None) -> Features:
    """Features of every prompt + completion, in their order. `logprobs` needs a causal LM.

    Texts that share a prompt (a tree's nodes and rollouts all do) run it once, and their
    completions as one token tree where the model allows it; the prefix all the prompts open
    with runs once for all of them (critics.shared_prompt; 14x fewer tokens than a pass per text
    on 16 demo trees). A text longer than `max_length`, with an empty prompt or with a prompt of
    its own runs in a left-padded batch (long texts keep their tail). `tap`: told about each
    shared-prompt forward (pipeline.lm.trunk.Trunk records what its frozen trunk computed)."""
    lm_head = model.get_output_embeddings() if logprobs else None
    if logprobs and lm_head is None:
        raise ValueError("critics.orm_features=confidence and critics.state_features=confidence "
                         "need a causal LM backbone (one with an output embedding); set both to "
                         "hidden for a base model")
    n = len(prompts)
    if n == 0:
        empty = torch.zeros(0, model.config.hidden_size)
        return Features(empty, empty, torch.zeros(0, len(LOGPROB_STATS)) if logprobs else None)
    out = _Rows([None] * n, [None] * n, [None] * n)
    pairs = [(tokenizer(p, add_special_tokens=False).input_ids,
              tokenizer(c, add_special_tokens=False).input_ids if c else [])
             for p, c in zip(prompts, completions, strict=True)]
    groups, alone = group_by_prompt(pairs, max_length, min_group=2)
    for i, _, states, logps in grouped_states(model, groups, batch_size, pad_id(tokenizer), lm_head,
                                              tap):
        out.put(i, states[-1], states[0], None if logps is None else _logprob_stats(logps))
    _left_padded(model, lm_head, tokenizer, prompts, completions, alone, batch_size, max_length, out)
    return Features(torch.stack(out.hidden), torch.stack(out.prompt),
                    torch.stack(out.logprob) if logprobs else None)


@torch.no_grad()
def _left_padded(model, lm_head, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                 which: list[int], batch_size: int, max_length: int, out: _Rows) -> None:
    """Texts run one pass each, left-padded in batches (long texts keep their tail)."""
    order = sorted(which, key=lambda i: len(prompts[i]) + len(completions[i]))  # less padding
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        enc = encode_left_padded(tokenizer, [prompts[i] for i in rows],
                                 [completions[i] for i in rows], max_length)
        input_ids = enc.input_ids.to(model.device)
        hidden = model.base_model(input_ids=input_ids, attention_mask=enc.attention_mask.to(model.device),
                                  position_ids=enc.position_ids.to(model.device),
                                  use_cache=False).last_hidden_state
        for j, i in enumerate(rows):
            count = enc.completion_tokens[j]
            stats = None
            if lm_head is not None:
                stats = _logprob_stats(picked_logprobs(
                    lm_head, hidden[j, -count - 1:-1] if count else hidden[j, :0],
                    input_ids[j, input_ids.shape[1] - count:]))
            # the token before the first scored completion token: the prompt's last, if kept
            out.put(i, hidden[j, -1], hidden[j, -count - 1], stats)
