"""pipeline.lm.teacher_forced: log-probs from logits at the completions' positions only, in row
chunks that bound memory, equal to a plain full forward of each row alone."""

from __future__ import annotations

import pytest
import torch
from test_prefix_cache import prompts_for, smol_tiny, smol_tokenizer, varied  # noqa: F401 fixtures

from pipeline.lm import teacher_forced
from pipeline.lm.teacher_forced import completion_logprobs, token_logprobs

COMPLETIONS = ["1 + 2 = 3\n", "", "so the answer is 42", "x", "Step one.\nStep two.\n"]


def alone(model, tokenizer, prompt: str, ids: list[int]) -> list[float]:
    """One unpadded row, every position's logits: the definition."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=full).logits[0, :-1].float(), -1)
    picked = logp.gather(1, full[0, 1:, None]).squeeze(1)
    return picked[len(prompt_ids) - 1:].tolist()


@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
@pytest.mark.parametrize("logits_mb", [256, 0])  # 0: one row per forward
def test_chunked_tail_logprobs_equal_each_row_alone(which, logits_mb, request, monkeypatch):
    model, tokenizer = request.getfixturevalue(which)
    monkeypatch.setattr(teacher_forced, "LOGITS_MB", logits_mb)
    prompts = prompts_for(tokenizer)[:len(COMPLETIONS)]
    found = completion_logprobs(model, tokenizer, prompts, COMPLETIONS, batch_size=4)
    ids = [tokenizer(c, add_special_tokens=False).input_ids for c in COMPLETIONS]
    by_ids = token_logprobs(model, tokenizer, prompts, ids, batch_size=3)
    for prompt, row, same, c in zip(prompts, found, by_ids, ids):
        assert len(row) == len(c)
        assert row == pytest.approx(alone(model, tokenizer, prompt, c), abs=1e-4)
        assert same == pytest.approx(row, abs=1e-5)


@pytest.mark.parametrize("which", ["varied", "smol_tiny"])
def test_completions_sharing_a_prompt_get_their_own_pass_log_probs(which, request):
    """A problem's samples and a node's options share their prompt: it runs once for all of
    them, and every completion's log-probs equal a pass of its own (with SmolLM2's BPE too)."""
    model, tokenizer = request.getfixturevalue(which)
    prompts = prompts_for(tokenizer)[:2]
    completions = ["", "1 + 2 = 3\n", "1 + 2 = 3\n\n3 + 4 = 7\n", "Answer: 7", "x", "so the answer is 42"]
    texts = [(p, c) for p in prompts for c in completions] + [(prompts[0] + "Step 1\n", "x")]
    found = completion_logprobs(model, tokenizer, [p for p, _ in texts], [c for _, c in texts],
                                batch_size=3)
    for (prompt, completion), row in zip(texts, found, strict=True):
        ids = tokenizer(completion, add_special_tokens=False).input_ids
        assert row == pytest.approx(alone(model, tokenizer, prompt, ids), abs=1e-4)


def test_soft_capped_logits_run_each_text_whole(request, monkeypatch):
    """A model whose logits are not lm_head(hidden) (Gemma 2's soft-capping) must not read
    log-probs from shared hidden states: every text then runs its own forward."""
    model, tokenizer = request.getfixturevalue("varied")
    calls = []
    monkeypatch.setattr(teacher_forced, "grouped_states",  # records the prompt groups it is given
                        lambda model, groups, *a: calls.extend(groups) or iter(()))
    prompts = prompts_for(tokenizer)[:1] * 3
    completion_logprobs(model, tokenizer, prompts, ["a", "b", "c"])
    assert len(calls) == 1  # plain logits: the three share their prompt
    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    found = completion_logprobs(model, tokenizer, prompts, ["a", "b", "c"])
    assert len(calls) == 1 and [len(r) for r in found] == [1, 1, 1]
