"""Critic features: one backbone pass per (prompt, completion), shared by every head.

Three features come out of the same pass:
- hidden: the backbone's final hidden state (after the final norm) at the last token; the
  value and PRM heads read it, and the ORM with `critics.orm_features=hidden`.
- prompt_hidden: the same at the prompt's last token: what the backbone makes of the problem.
- logprob: how sure the backbone LM is of the completion, token by token: the mean, minimum
  and sum of the completion tokens' log-probabilities and their count.
The default ORM (`critics.orm_features=confidence`) reads logprob and prompt_hidden: hidden
states separate problems from each other well but right from wrong answers *to one problem*
poorly, which is what best-of-N selection needs (measured in the README).

We call the model's base (`model.base_model`: the decoder inside a causal LM, or an `AutoModel`
itself) and project to the vocabulary only at the completion's positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in rows])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in rows])
    # Positions count real tokens only, so a padded row sees what it would see alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return Encoded(input_ids, mask, positions, counts)


def _logprob_stats(lm_head, hidden: torch.Tensor, input_ids: torch.Tensor, count: int) -> torch.Tensor:
    """Statistics of one row's last `count` token log-probs (left padding: the completion is the
    row's tail). No completion: all zeros."""
    if count == 0:
        return torch.zeros(len(LOGPROB_STATS))
    logits = lm_head(hidden[-count - 1:-1]).float()
    logp = torch.log_softmax(logits, -1).gather(-1, input_ids[-count:, None]).squeeze(-1)
    stats = torch.stack([logp.mean(), logp.min(), logp.sum()]).cpu()  # the model may be on a GPU
    return torch.cat([stats, torch.tensor([float(count)])])


@torch.no_grad()
def backbone_features(model, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                      batch_size: int, max_length: int, logprobs: bool = False) -> Features:
    """Features of every prompt + completion, in their order. `logprobs` needs a causal LM."""
    lm_head = model.get_output_embeddings() if logprobs else None
    if logprobs and lm_head is None:
        raise ValueError("critics.orm_features=confidence needs a causal LM backbone (one with "
                         "an output embedding); use critics.orm_features=hidden for a base model")
    n = len(prompts)
    hidden_out: list[torch.Tensor | None] = [None] * n
    prompt_out: list[torch.Tensor | None] = [None] * n
    logprob_out: list[torch.Tensor | None] = [None] * n
    base = model.base_model
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(completions[i]))  # less padding
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        enc = encode_left_padded(tokenizer, [prompts[i] for i in rows],
                                 [completions[i] for i in rows], max_length)
        input_ids = enc.input_ids.to(model.device)
        hidden = base(input_ids=input_ids, attention_mask=enc.attention_mask.to(model.device),
                      position_ids=enc.position_ids.to(model.device), use_cache=False).last_hidden_state
        last = hidden[:, -1].float().cpu()  # left padding: the last position is the last token
        for j, i in enumerate(rows):
            hidden_out[i] = last[j]
            # the token before the first scored completion token: the prompt's last, if kept
            prompt_out[i] = hidden[j, -enc.completion_tokens[j] - 1].float().cpu()
            if logprobs:
                logprob_out[i] = _logprob_stats(lm_head, hidden[j], input_ids[j], enc.completion_tokens[j])
    if n == 0:
        empty = torch.zeros(0, model.config.hidden_size)
        return Features(empty, empty, torch.zeros(0, len(LOGPROB_STATS)) if logprobs else None)
    return Features(torch.stack(hidden_out), torch.stack(prompt_out),
                    torch.stack(logprob_out) if logprobs else None)
