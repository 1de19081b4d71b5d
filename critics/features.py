"""Critic features: one backbone pass per text, shared by every head.

The feature of a text is the backbone's final hidden state (after the final norm) at its last
token. We call the model's base (`model.base_model`: the decoder inside a causal LM, or an
`AutoModel` itself), so the vocabulary projection is never computed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def encode_left_padded(tokenizer, texts: Sequence[str], max_length: int):
    """(input_ids, attention_mask, position_ids), left padded; long texts keep their tail,
    where the newest step and the answer are."""
    ids = [tokenizer(t, add_special_tokens=False).input_ids[-max_length:] for t in texts]
    if not all(ids):
        raise ValueError("a critic text tokenizes to nothing; texts include the prompt")
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    # Positions count real tokens only, so a padded row sees what it would see alone.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids, mask, positions


@torch.no_grad()
def hidden_features(model, tokenizer, texts: Sequence[str], batch_size: int,
                    max_length: int) -> torch.Tensor:
    """(len(texts), hidden) float32 features on the CPU, in the order of `texts`."""
    if not texts:
        return torch.zeros(0, model.config.hidden_size)
    base = model.base_model
    out: list[torch.Tensor | None] = [None] * len(texts)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        input_ids, mask, positions = encode_left_padded(tokenizer, [texts[i] for i in rows],
                                                        max_length)
        hidden = base(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                      position_ids=positions.to(model.device), use_cache=False).last_hidden_state
        last = hidden[:, -1].float().cpu()  # left padding: the last position is the last token
        for j, i in enumerate(rows):
            out[i] = last[j]
    return torch.stack(out)
