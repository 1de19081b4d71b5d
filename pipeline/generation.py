"""Batched generation: the one place qstar samples text from a model.

MCTS options, fast rollouts, best-of-N, beam scoring and eval all come through here.
It wraps `model.generate` (left padding, KV cache, greedy or sampled) and adds two small
hooks: a logits processor that keeps the step's unwarped log-softmax, and a stopping
criterion that records each chosen token's log-prob and ends a row at an option boundary
(end of line fast path on token ids; any text rule, e.g. a step-marker regex, by decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria

from pipeline.progress import progress_bar


class StopRule(Protocol):
    """What ends an option (mcts.options.OptionEnd satisfies this)."""

    kind: str  # "newline" gets the token-id fast path

    def ends(self, new_text: str) -> bool: ...

    def cut(self, new_text: str) -> str: ...


@dataclass
class Generation:
    text: str  # decoded new text (cut at the stop rule's boundary)
    token_ids: list[int]  # new tokens, through the stop token
    logprobs: list[float]  # per new token, under the model's unwarped distribution
    finished: bool  # ended with EOS (the solution is complete)
    stopped: bool  # ended by the stop rule (an option boundary) or the option cap with a rollout
    # With rollout_tokens > 0: the greedy continuation after the boundary (the fast rollout).
    rollout: str = ""
    rollout_logprobs: list[float] | None = None
    rollout_finished: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def rollout_tokens(self) -> int:
        return len(self.rollout_logprobs or [])


class _KeepLogSoftmax(LogitsProcessor):
    # Runs before temperature/top-p warpers, so it sees the model's own distribution.
    def __init__(self):
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids, scores):
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _GreedyAfterBoundary(LogitsProcessor):
    """Rows past their option boundary continue greedily: the fast rollout, same KV cache."""

    def __init__(self, record: _RecordAndStop):
        self.record = record

    def __call__(self, input_ids, scores):
        past = self.record.boundary_at
        if past is None or not bool((past >= 0).any()):
            return scores
        rows = (past >= 0).to(scores.device)
        best = scores.argmax(dim=-1, keepdim=True)
        onehot = torch.full_like(scores, float("-inf")).scatter(1, best, 0.0)
        return torch.where(rows[:, None], onehot, scores)


class _RecordAndStop(StoppingCriteria):
    """Records each chosen token's log-prob; finds each row's option boundary; ends rows.

    A row's boundary is its first newline token (fast path), the stop rule's text boundary, or
    the option cap. Without a rollout the row ends there; with one it goes on greedily for up to
    `rollout_tokens` more (unless `final(option_text)` says the option already ends the solution).
    """

    def __init__(self, tokenizer, prompt_len: int, batch: int, keep: _KeepLogSoftmax,
                 eos_ids: torch.Tensor, stop: StopRule | None, newline_ids: torch.Tensor | None,
                 option_cap: int, rollout_tokens: int, final):
        self.tokenizer, self.prompt_len, self.keep = tokenizer, prompt_len, keep
        self.eos_ids, self.stop, self.newline_ids = eos_ids, stop, newline_ids
        self.option_cap, self.rollout_tokens, self.final = option_cap, rollout_tokens, final
        self.logprobs: list[torch.Tensor] = []  # per step: (batch,)
        self.boundary_at = torch.full((batch,), -1, dtype=torch.long)  # step of the boundary token
        self.done_at = torch.full((batch,), -1, dtype=torch.long)  # step where the row ended
        self.by_eos = torch.zeros(batch, dtype=torch.bool)

    def __call__(self, input_ids, scores, **kwargs):
        token = input_ids[:, -1]
        step = input_ids.shape[1] - self.prompt_len - 1
        self.logprobs.append(self.keep.last.gather(1, token[:, None]).squeeze(1).cpu())
        running = self.done_at < 0
        eos = torch.isin(token, self.eos_ids).cpu() & running
        self.by_eos |= eos
        self.done_at[eos] = step
        in_option = running & ~eos & (self.boundary_at < 0)
        boundary = self._boundaries(input_ids, token, step, in_option)
        self.boundary_at[boundary] = step
        ends_here = boundary if self.rollout_tokens == 0 else self._final_options(input_ids, boundary)
        rollout_over = (self.boundary_at >= 0) & (step - self.boundary_at >= self.rollout_tokens)
        self.done_at[(ends_here | rollout_over) & (self.done_at < 0)] = step
        return (self.done_at >= 0).to(input_ids.device)

    def _boundaries(self, input_ids, token, step: int, in_option: torch.Tensor) -> torch.Tensor:
        if self.stop is None:
            return torch.zeros_like(in_option)
        if self.newline_ids is not None:
            hit = torch.isin(token, self.newline_ids).cpu() & in_option
        else:
            hit = torch.zeros_like(in_option)
            for row in torch.nonzero(in_option).flatten().tolist():
                hit[row] = self.stop.ends(self._text(input_ids, row))
        if step + 1 >= self.option_cap:
            hit |= in_option
        return hit

    def _final_options(self, input_ids, boundary: torch.Tensor) -> torch.Tensor:
        ends = torch.zeros_like(boundary)
        for row in torch.nonzero(boundary).flatten().tolist():
            ends[row] = bool(self.final(self.stop.cut(self._text(input_ids, row))))
        return ends

    def _text(self, input_ids, row: int) -> str:
        return self.tokenizer.decode(input_ids[row, self.prompt_len:], skip_special_tokens=True)


_NEWLINE_IDS: dict[int, torch.Tensor] = {}


def newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids of every token whose text contains a newline (cached per tokenizer)."""
    key = id(tokenizer)
    if key not in _NEWLINE_IDS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _NEWLINE_IDS[key] = torch.tensor([i for i, t in enumerate(texts) if "\n" in t])
    return _NEWLINE_IDS[key]


def eos_token_ids(model, tokenizer) -> torch.Tensor:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return torch.tensor(sorted(ids))


def chat_prompt(tokenizer, messages: list[dict], continuation: str = "") -> str:
    """The chat-templated prompt, opened for the assistant, plus any steps already written."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt + continuation


def sampling_kwargs(model, tokenizer, max_new_tokens: int, temperature: float, top_p: float) -> dict:
    """`generate` kwargs; temperature 0 means greedy. top_k=0 so sampling sees the whole vocab."""
    common = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=eos_token_ids(model, tokenizer).tolist())
    if temperature <= 0:
        return dict(common, do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(common, do_sample=True, temperature=temperature, top_p=top_p, top_k=0)


def _length_sorted_batches(prompts: Sequence[str], batch_size: int) -> list[list[int]]:
    # Similar lengths in one batch waste less compute on padding.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop: StopRule | None = None,
             rollout_tokens: int = 0, final=None, batch_size: int = 32,
             seed: int | None = None, progress: str | None = None) -> list[Generation]:
    """Continue each prompt (already chat-templated text) until EOS, the stop rule or the cap.

    With `stop`, `max_new_tokens` caps the option. With `rollout_tokens` > 0 each row then goes
    on greedily, up to that many tokens, as the fast rollout of the new node (unless
    `final(option_text)` is true: an answer line needs no rollout).
    """
    if rollout_tokens and stop is None:
        raise ValueError("rollout_tokens needs a stop rule: the rollout starts at the option boundary")
    results: list[Generation | None] = [None] * len(prompts)
    eos_ids = eos_token_ids(model, tokenizer).to(model.device)
    newline_ids = None
    if stop is not None and stop.kind == "newline":
        newline_ids = newline_token_ids(tokenizer).to(model.device)
    kwargs = sampling_kwargs(model, tokenizer, max_new_tokens + rollout_tokens, temperature, top_p)
    batches = _length_sorted_batches(prompts, batch_size)
    for b, rows in enumerate(progress_bar(batches, desc=progress, unit="batch")):
        if seed is not None:
            torch.manual_seed(seed + b)
        enc = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        prompt_len = enc.input_ids.shape[1]
        keep = _KeepLogSoftmax()
        record = _RecordAndStop(tokenizer, prompt_len, len(rows), keep, eos_ids, stop, newline_ids,
                                max_new_tokens, rollout_tokens, final or (lambda text: False))
        processors = [keep] + ([_GreedyAfterBoundary(record)] if rollout_tokens else [])
        out = model.generate(**enc, logits_processor=LogitsProcessorList(processors),
                             stopping_criteria=[record], **kwargs)
        logprobs = torch.stack(record.logprobs, dim=1)  # (batch, steps)
        for j, i in enumerate(rows):
            results[i] = _row_result(tokenizer, out[j, prompt_len:], logprobs[j], record, j, stop)
    return results


def _row_result(tokenizer, new_ids: torch.Tensor, logprobs: torch.Tensor,
                record: _RecordAndStop, row: int, stop: StopRule | None) -> Generation:
    done_at, boundary_at = int(record.done_at[row]), int(record.boundary_at[row])
    length = done_at + 1 if done_at >= 0 else len(logprobs)
    option_len = boundary_at + 1 if boundary_at >= 0 else length
    ids, lps = new_ids[:length].tolist(), logprobs[:length].tolist()
    finished = bool(record.by_eos[row])
    full = tokenizer.decode(ids, skip_special_tokens=True)
    option = tokenizer.decode(ids[:option_len], skip_special_tokens=True)
    if stop is not None and boundary_at >= 0:
        option = stop.cut(option)
    rollout_ids = ids[option_len:]
    return Generation(
        text=option, token_ids=ids[:option_len], logprobs=lps[:option_len],
        finished=finished and not rollout_ids, stopped=boundary_at >= 0,
        rollout=full[len(option):] if rollout_ids or boundary_at >= 0 else "",
        rollout_logprobs=lps[option_len:], rollout_finished=finished and bool(rollout_ids),
    )


@torch.no_grad()
def plain_generate_tokens(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                          temperature: float, batch_size: int, seed: int = 0) -> int:
    """Plain `model.generate` on the same prompts; the baseline benchmarks compare against.

    Returns the number of new tokens (up to and including EOS) it produced.
    """
    eos = eos_token_ids(model, tokenizer)
    kwargs = sampling_kwargs(model, tokenizer, max_new_tokens, temperature, 1.0)
    total = 0
    for b, rows in enumerate(_length_sorted_batches(prompts, batch_size)):
        torch.manual_seed(seed + b)
        enc = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        out = model.generate(**enc, **kwargs)[:, enc.input_ids.shape[1]:].cpu()
        for row in out:
            hits = torch.nonzero(torch.isin(row, eos)).flatten()
            total += int(hits[0]) + 1 if len(hits) else len(row)
    return total


@torch.no_grad()
def completion_logprobs(model, tokenizer, prompts: Sequence[str], completions: Sequence[str],
                        batch_size: int = 16) -> list[list[float]]:
    """Teacher-forced per-token log-probs of each completion after its prompt.

    Used by the implicit DPO reward (log pi - log pi_ref) and by beam scoring.
    """
    results: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk_p = prompts[start:start + batch_size]
        chunk_c = completions[start:start + batch_size]
        p_ids = [tokenizer(p, add_special_tokens=False).input_ids for p in chunk_p]
        c_ids = [tokenizer(c, add_special_tokens=False).input_ids for c in chunk_c]
        seqs = [p + c for p, c in zip(p_ids, c_ids)]
        width = max(len(s) for s in seqs)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        logits = model(input_ids=input_ids.to(model.device),
                       attention_mask=mask.to(model.device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        token_logp = logp.gather(2, input_ids[:, 1:, None].to(model.device)).squeeze(2).cpu()
        for row, c in enumerate(c_ids):
            results.append(token_logp[row, width - 1 - len(c):].tolist() if c else [])
    return results
