"""Batched generation: the one place qstar samples text from a model.

MCTS options, fast rollouts, best-of-N, beam scoring and eval all come through here.
It is a small KV-cached decoding loop (left padding, greedy or temperature/top-p sampling)
rather than `model.generate`, for two reasons measured on CPU: rows leave the batch and the
cache as soon as they stop (arithmetic answers end after ~10 tokens while a few rows ramble
to the cap, and `generate` keeps computing every row until the longest stops), and a row can
go on from its option into its rollout (sampled or greedy) at the option boundary without a
second prefill. It records each token's log-prob under the model's own (unwarped) distribution and
ends options at a boundary (newline fast path on token ids; any text rule by decoding only the
new tokens). Rows with the same prompt share one prefill, and with a `PrefixCache`
(pipeline/lm/prefix_cache.py) a prompt prefills only what no earlier row already ran.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mcts.options import word_starts
from pipeline.lm.prefix_cache import PrefixCache, forward_last, prefill, retire
from pipeline.run.progress import progress_bar


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
    # With hidden=True: the final hidden state at the prompt's last token, at the option's last
    # text token and at the row's last text token (the rollout's, or the option's when it has
    # none). A final EOS is no text: the state before it is the prompt + text's last.
    prompt_hidden: torch.Tensor | None = None
    option_hidden: torch.Tensor | None = None
    end_hidden: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))

    @property
    def rollout_tokens(self) -> int:
        return len(self.rollout_logprobs or [])


def newline_token_ids(tokenizer) -> torch.Tensor:
    """Ids of every token whose text contains a newline (computed once, kept on the tokenizer)."""
    cached = getattr(tokenizer, "_qstar_newline_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = torch.tensor([i for i, t in enumerate(texts) if "\n" in t])
        tokenizer._qstar_newline_ids = cached
    return cached


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
             rollout_tokens: int = 0, rollout_temperature: float = 0.0, final=None,
             batch_size: int = 32, seed: int | None = None, seeds: Sequence[int] | None = None,
             progress: str | None = None,
             prefix_cache: PrefixCache | None = None, hidden: bool = False) -> list[Generation]:
    """Continue each prompt (already chat-templated text) until EOS, the stop rule or the cap.

    Randomness: `seeds` (one per prompt) gives each row its own generator, so a row's sample
    does not depend on the other prompts or on the batching; else `seed` seeds each batch.

    With `stop`, `max_new_tokens` caps the option. With `rollout_tokens` > 0 each row then goes
    on, up to that many tokens, as the fast rollout of the new node: greedily, or sampled at
    `rollout_temperature` from the row's own uniforms when it is above 0 (unless
    `final(option_text)` is true: an answer line needs no rollout). With `prefix_cache`, prompts
    reuse the KV of earlier rows' token prefixes, and each finished row's KV is kept there.

    `hidden`: each Generation also carries the final hidden states the decoding computed at the
    prompt's, the option's and the row's last token (the critics' features without a second
    pass); a row that stops runs its last token through the model once more for it.
    """
    if rollout_tokens and stop is None:
        raise ValueError("rollout_tokens needs a stop rule: the rollout starts at the option boundary")
    rule = _Rule(tokenizer, eos_token_ids(model, tokenizer).to(model.device), stop,
                 newline_token_ids(tokenizer).to(model.device) if stop is not None and
                 stop.kind == "newline" else None, max_new_tokens, rollout_tokens,
                 final or (lambda text: False), rollout_temperature)
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    results: list[Generation | None] = [None] * len(prompts)
    for b, rows in enumerate(progress_bar(_length_sorted_batches(prompts, batch_size),
                                          desc=progress, unit="batch")):
        generators = None
        if seeds is not None:
            generators = [torch.Generator().manual_seed(int(seeds[i]) % 2**63) for i in rows]
        elif seed is not None:
            torch.manual_seed(seed + b)
        for i, row in zip(rows, _decode_batch(model, tokenizer, [prompts[i] for i in rows], rule,
                                              temperature, top_p, generators, prefix_cache,
                                              hidden)):
            results[i] = row
    return results


@dataclass
class _Rule:
    """Where rows stop: EOS, the option boundary (+ optional rollout), the caps."""

    tokenizer: object
    eos_ids: torch.Tensor
    stop: StopRule | None
    newline_ids: torch.Tensor | None  # fast path for the newline stop rule
    option_cap: int
    rollout_tokens: int
    final: object
    rollout_temperature: float = 0.0  # 0: the rollout is greedy


@dataclass
class _Row:
    tokens: list[int]
    logprobs: list[float]  # filled at the end of the batch (recorded on the device meanwhile)
    boundary: int = -1  # index of the option's last token; -1 while still in the option
    eos: bool = False
    text: str = ""  # text rules only: the decoded option so far, extended token by token
    prefix_at: int = 0  # incremental decoding window: tokens[prefix_at:read_at] are context
    read_at: int = 0
    prompt_hidden: torch.Tensor | None = None  # hidden=True only: see Generation
    option_hidden: torch.Tensor | None = None
    end_hidden: torch.Tensor | None = None

    @property
    def option_len(self) -> int:
        return self.boundary + 1 if self.boundary >= 0 else len(self.tokens)


def _sample(logits: torch.Tensor, temperature: float, top_p: float,
            uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling with one given uniform per row, so a row's draw does not depend on
    which other rows are still in the batch."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # keep the nucleus
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(1, order, sorted_probs)
    cdf = probs.cumsum(dim=-1)
    threshold = uniform.to(cdf.device)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, threshold).squeeze(1).clamp(max=probs.shape[-1] - 1)


def _choose(logits: torch.Tensor, in_rollout: torch.Tensor, rule: _Rule, temperature: float,
            top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Each live row's next token: its option's sample, or once past the boundary its rollout's
    (the same draw when the two temperatures agree, greedy at rollout temperature 0)."""
    sampled = _sample(logits, temperature, top_p, uniform)
    rolled = (sampled if rule.rollout_temperature == temperature else
              _sample(logits, rule.rollout_temperature, top_p, uniform))
    return torch.where(in_rollout, rolled, sampled)


def _decode_batch(model, tokenizer, prompts: list[str], rule: _Rule, temperature: float,
                  top_p: float, generators: list | None = None,
                  store: PrefixCache | None = None, hidden: bool = False) -> list[Generation]:
    """KV-cached decoding that drops each row from the batch (and the cache) once it stops,
    so a batch costs the sum of its rows' lengths, not batch size x the longest row.
    One prefill per distinct prompt (and, with a usable `store`, only past its cached prefix);
    one host sync per step (the chosen tokens and their stop flags).
    `generators` (one per row): each live row draws its uniform from its own generator.
    `hidden`: the step's forward runs before the stopped rows leave, so it sees their last token."""
    start = prefill(model, tokenizer, prompts, store, hidden)
    cache, mask, logits = start.cache, start.mask, start.logits
    keep_kv = store if store is not None and store.usable(model) else None
    rows = [_Row([], []) for _ in prompts]
    live = list(range(len(prompts)))  # original index of each row still in the batch
    steps = rule.option_cap + rule.rollout_tokens
    logprobs = torch.zeros((len(prompts), steps), device=logits.device)  # read once, at the end
    for row, h in zip(rows, start.hidden.cpu() if hidden else []):
        row.prompt_hidden = h
    # hidden=True: the hidden state at each row's k-th new token, written at step k (a row adds
    # one token per step while it is live); read once, at the end, like the log-probs
    hiddens = start.hidden.new_zeros((len(prompts), steps, start.hidden.shape[-1])) if hidden else None
    never = torch.zeros((), dtype=torch.bool, device=logits.device)
    for step in range(steps):
        in_rollout = torch.tensor([rows[r].boundary >= 0 for r in live], device=logits.device)
        chosen = _choose(logits, in_rollout, rule, temperature, top_p,
                         _uniforms(len(prompts), live, generators))
        live_index = torch.tensor(live, device=logits.device)
        logprobs[live_index, step] = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)
        newline = torch.isin(chosen, rule.newline_ids) if rule.newline_ids is not None else never
        flags = torch.stack([chosen, torch.isin(chosen, rule.eos_ids).long(),
                             newline.long().expand_as(chosen)]).tolist()  # the step's one sync
        keep = []
        for j, (r, token, eos, nl) in enumerate(zip(live, *flags)):
            rows[r].tokens.append(token)
            if not _row_ends(rows[r], rule, bool(eos), bool(nl)):
                keep.append(j)
        if hidden:  # every row feeds its token: the stopped ones for their last hidden state
            mask, logits, hiddens[live_index, step] = _step(model, cache, mask, chosen, True)
        if len(keep) < len(live) and keep_kv is not None:
            for j in sorted(set(range(len(live))) - set(keep)):
                retire(keep_kv, cache, j, mask[j], start.prompt_ids[live[j]], rows[live[j]].tokens)
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=logits.device)
            cache.batch_select_indices(index)
            mask, chosen, logits = mask[index], chosen[index], logits[index]
            live = [live[j] for j in keep]
        if not hidden:
            mask, logits, _ = _step(model, cache, mask, chosen, False)
    else:
        for j, r in enumerate(live if keep_kv is not None else []):
            retire(keep_kv, cache, j, mask[j], start.prompt_ids[r], rows[r].tokens)
    for row, lps in zip(rows, logprobs.tolist()):
        row.logprobs = lps[:len(row.tokens)]
    if hidden:
        _read_hidden(rows, hiddens)
    return [_row_result(tokenizer, row, rule.stop) for row in rows]


def _step(model, cache, mask: torch.Tensor, chosen: torch.Tensor, hidden: bool):
    """Run the chosen tokens through the model: the extended mask, the next logits and, with
    `hidden`, the hidden state at each chosen token."""
    mask = torch.cat([mask, mask.new_ones((len(chosen), 1))], dim=1)
    positions = mask.sum(-1, keepdim=True) - 1
    logits, last = forward_last(model, hidden, cache, input_ids=chosen[:, None],
                                attention_mask=mask, position_ids=positions)
    return mask, logits, last


def _read_hidden(rows: list[_Row], hiddens: torch.Tensor) -> None:
    """Each row's hidden state at its option's and its own last text token (not a final EOS;
    where no text token precedes it, the prompt's last token)."""
    def last_text(length: int, row: _Row) -> int:
        return length - 1 - (row.eos and length == len(row.tokens))

    at = [[last_text(row.option_len, row), last_text(len(row.tokens), row)] for row in rows]
    index = torch.tensor(at, device=hiddens.device).clamp(min=0)
    picked = hiddens[torch.arange(len(rows), device=hiddens.device)[:, None], index].float().cpu()
    for row, (option, end), (o, e) in zip(rows, picked, at):
        row.option_hidden = option if o >= 0 else row.prompt_hidden
        row.end_hidden = end if e >= 0 else row.prompt_hidden


def _uniforms(num_rows: int, live: list[int], generators: list | None) -> torch.Tensor:
    """One uniform per live row for this step: from each row's own generator, or one draw per
    original row from the global generator (so a row's draw ignores which rows still run)."""
    if generators is None:
        return torch.rand(num_rows)[live]
    return torch.cat([torch.rand(1, generator=generators[r]) for r in live])


def _row_ends(row: _Row, rule: _Rule, eos: bool, newline: bool) -> bool:
    """Update the row after its newest token; True when it stops generating."""
    if eos:
        row.eos = True
        return True
    n = len(row.tokens)
    if row.boundary >= 0:  # in the rollout
        return n - 1 - row.boundary >= rule.rollout_tokens
    if rule.stop is None:
        return n >= rule.option_cap
    if rule.newline_ids is not None:  # decode only at a newline (leading newlines are no end)
        at_boundary = newline and rule.stop.ends(_text(rule, row))
    else:  # a text rule: decode only the new token(s), then ask the rule
        _extend_text(rule.tokenizer, row)
        at_boundary = rule.stop.ends(row.text)
    if not (at_boundary or n >= rule.option_cap):
        return False
    row.boundary = n - 1 if at_boundary else _last_word_end(rule.tokenizer, row.tokens)
    if rule.rollout_tokens == 0:
        return True
    return bool(rule.final(rule.stop.cut(_text(rule, row, row.boundary + 1))))


def _last_word_end(tokenizer, tokens: list[int]) -> int:
    """The option cap: index of the last token before a word starts, so the cap never cuts a
    word (the tokens after it go to the rollout, or are dropped). One word longer than the cap
    is cut at the cap."""
    pieces = tokenizer.batch_decode([[t] for t in tokens], skip_special_tokens=True)
    if pieces[-1][-1:].isspace():
        return len(tokens) - 1
    for k in range(len(tokens) - 1, 0, -1):
        if word_starts(pieces[k], pieces[k - 1]):
            return k - 1
    return len(tokens) - 1


def _extend_text(tokenizer, row: _Row) -> None:
    """Incremental detokenization (as vLLM's): decode a short window of tokens with one token of
    left context, so leading spaces and multi-byte characters split over tokens come out as in
    a decode of the whole row; text is only appended once it is not a partial character."""
    before = tokenizer.decode(row.tokens[row.prefix_at:row.read_at], skip_special_tokens=True)
    after = tokenizer.decode(row.tokens[row.prefix_at:], skip_special_tokens=True)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        row.text += after[len(before):]
        row.prefix_at, row.read_at = row.read_at, len(row.tokens)


def _text(rule: _Rule, row: _Row, length: int | None = None) -> str:
    return rule.tokenizer.decode(row.tokens[:length], skip_special_tokens=True)


def _row_result(tokenizer, row: _Row, stop: StopRule | None) -> Generation:
    option_len = row.option_len
    option_ids, rollout_ids = row.tokens[:option_len], row.tokens[option_len:]
    option = tokenizer.decode(option_ids, skip_special_tokens=True)
    if stop is not None and row.boundary >= 0:
        option = stop.cut(option)
    full = tokenizer.decode(row.tokens, skip_special_tokens=True)
    return Generation(
        text=option, token_ids=option_ids, logprobs=row.logprobs[:option_len],
        finished=row.eos and not rollout_ids, stopped=row.boundary >= 0,
        rollout=full[len(option):] if row.boundary >= 0 else "",
        rollout_logprobs=row.logprobs[option_len:], rollout_finished=row.eos and bool(rollout_ids),
        prompt_hidden=row.prompt_hidden, option_hidden=row.option_hidden, end_hidden=row.end_hidden,
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
