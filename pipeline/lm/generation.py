"""Batched generation: the one place qstar samples text from a model.

MCTS options, fast rollouts, best-of-N, beam scoring and eval all come through here.
It is a small KV-cached decoding loop (left padding, greedy or temperature/top-p sampling)
rather than `model.generate`, for three reasons measured on CPU: rows leave the batch and the
cache as soon as they stop (arithmetic answers end after ~10 tokens while a few rows ramble
to the cap, and `generate` keeps computing every row until the longest stops); waiting rows
join the running batch as others leave (pipeline/lm/running_batch.py), so it stays full; and
a row can go on from its option into its rollout (sampled or greedy) at the option boundary
without a second prefill. It records each token's log-prob under the model's own (unwarped)
distribution and ends options at a boundary (pipeline/lm/stopping.py). Rows with the same
prompt share one prefill, and with a `PrefixCache` (pipeline/lm/prefix_cache.py) a prompt
prefills only what no earlier row already ran.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from critics.shared_prompt import plain_kv_layers
from pipeline.lm.prefix_cache import PrefixCache, forward_last, prefill, retire
from pipeline.lm.running_batch import HiddenSlots, RunningBatch
from pipeline.lm.stopping import (
    Generation,
    OptionClaims,
    Row,
    Rule,
    StopRule,
    replay,
    row_ends,
    row_result,
)
from pipeline.run.progress import progress_bar

__all__ = ["Decoder", "Generation", "StopRule", "chat_prompt", "eos_token_ids", "generate",
           "newline_token_ids", "plain_generate_tokens", "replayed", "row_seed", "sampling_kwargs",
           "streaming_decoder"]


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
             rollout_tokens: int = 0, rollout_temperature: float = 0.0, final=None, wrong=None,
             batch_size: int = 32, seed: int | None = None, seeds: Sequence[int] | None = None,
             progress: str | None = None, prefix_cache: PrefixCache | None = None,
             hidden: bool = False, groups: Sequence | None = None,
             claims: OptionClaims | None = None, checks: Sequence | None = None) -> list[Generation]:
    """Continue each prompt (already chat-templated text) until EOS, the stop rule or the cap.

    At most `batch_size` rows decode at once; as rows stop, the next prompts join the running
    batch (pipeline/lm/running_batch.py), so the batch stays full until the call runs out.

    Randomness: every row draws from its own generator, seeded by `seeds[i]` (one per prompt)
    or, with `seed`, by (seed, i); so a row's sample depends on neither the other prompts nor
    the batching. With neither, rows draw from the global generator.

    With `stop`, `max_new_tokens` caps the option. With `rollout_tokens` > 0 each row then goes
    on, up to that many tokens, as the fast rollout of the new node: greedily, or sampled at
    `rollout_temperature` from the row's own uniforms when it is above 0 (unless
    `final(option_text)` is true: an answer line needs no rollout). With `prefix_cache`, prompts
    reuse the KV of earlier rows' token prefixes, and each finished row's KV is kept there.

    `hidden`: each Generation also carries the final hidden states the decoding computed at the
    prompt's, the option's and the row's last token (the critics' features without a second
    pass); a row that stops runs its last token through the model once more for it.

    `groups` (one per prompt) and `claims`: a row that reaches its option boundary with an
    option an earlier row of its group already wrote stops there (`OptionClaims`).

    `wrong(line_text)`: a step check; a row stops at the first option or line it flags
    (`Rule.wrong`; Generation.wrong, Generation.rollout_wrong). `checks` (one per prompt, or
    None): each row's own check on its text so far, asked at the same points (`Row.check`).
    """
    if seeds is None and seed is not None:
        seeds = [row_seed(seed, i) for i in range(len(prompts))]
    decoder = streaming_decoder(model, tokenizer, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, stop=stop,
                                rollout_tokens=rollout_tokens,
                                rollout_temperature=rollout_temperature, final=final, wrong=wrong,
                                prefix_cache=prefix_cache, hidden=hidden, claims=claims,
                                lines=checks is not None)
    rows = decoder.submit(list(prompts), seeds, groups, checks)
    with progress_bar(total=len(rows), desc=progress, unit="row") as bar:
        while decoder.busy:
            bar.update(len(decoder.advance(batch_size)))
    return [decoder.result(r) for r in rows]


def streaming_decoder(model, tokenizer, *, max_new_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0, stop: StopRule | None = None, rollout_tokens: int = 0,
                      rollout_temperature: float = 0.0, final=None, wrong=None,
                      prefix_cache: PrefixCache | None = None, hidden: bool = False,
                      claims: OptionClaims | None = None, lines: bool = False) -> Decoder:
    """A streaming `generate`: rows are submitted at any time (`Decoder.submit`), decode in one
    running batch, and come back as they finish (`Decoder.advance`). The arguments mean what they
    mean for `generate` (`lines`: rows come with checks); a row's tokens never depend on its batch."""
    if rollout_tokens and stop is None:
        raise ValueError("rollout_tokens needs a stop rule: the rollout starts at the option boundary")
    return Decoder(model, tokenizer, _rule(model, tokenizer, stop, max_new_tokens, rollout_tokens,
                                           final, rollout_temperature, wrong, lines),
                   temperature, top_p, prefix_cache, hidden, claims)


def replayed(model, tokenizer, tokens: list[int], logprobs: list[float], *, max_new_tokens: int,
             stop: StopRule, rollout_tokens: int, final=None,
             rollout_temperature: float = 0.0, wrong=None) -> Generation:
    """The Generation a row of `generate(...)` with these arguments would end as, had it decoded
    `tokens` (an option and its rollout: pipeline.lm.stopping.replay)."""
    return replay(_rule(model, tokenizer, stop, max_new_tokens, rollout_tokens, final,
                        rollout_temperature, wrong), tokens, logprobs)


def _rule(model, tokenizer, stop, max_new_tokens, rollout_tokens, final, rollout_temperature,
          wrong=None, checks: bool = False) -> Rule:
    """The newline tokens are flagged for the newline stop rule and for the step checks."""
    lines = checks or wrong is not None or (stop is not None and stop.kind == "newline")
    return Rule(tokenizer, eos_token_ids(model, tokenizer).to(model.device), stop,
                newline_token_ids(tokenizer).to(model.device) if lines else None, max_new_tokens,
                rollout_tokens, final or (lambda text: False), rollout_temperature, wrong)


def row_seed(seed: int, index: int) -> int:
    """Row `index`'s generator seed in a call seeded with `seed`."""
    return (int(seed) * 1_000_003 + index) % 2**63


class Decoder:
    """KV-cached decoding in a running batch. A row leaves the batch (and the cache) once it
    stops, and waiting rows join, so the rows cost the sum of their lengths at a nearly full
    batch. Rows may be submitted while others decode. One prefill per distinct prompt of a
    joining group (with a usable `store`, only past its cached prefix); one host sync per step
    (the chosen tokens and their stop flags). With `hidden` the step's forward runs before the
    stopped rows leave, so it sees their last token."""

    def __init__(self, model, tokenizer, rule: Rule, temperature: float, top_p: float,
                 store: PrefixCache | None, hidden: bool, claims: OptionClaims | None = None):
        self.model, self.tokenizer, self.rule = model, tokenizer, rule
        self.claims = claims if rule.rollout_tokens else None  # only a rollout is worth cutting
        self.epoch = claims.epoch() if self.claims is not None else 0
        self.temperature, self.top_p, self.store, self.hidden = temperature, top_p, store, hidden
        self.keep_kv = store if store is not None and store.usable(model) else None
        self.can_join = plain_kv_layers(model)
        self.prompts: list[str] = []
        self.rows: list[Row] = []
        self.prompt_ids: list[list[int]] = []
        self.generators: list[torch.Generator | None] = []  # None: the global generator
        self.steps = rule.option_cap + rule.rollout_tokens
        # each running row's k-th token's log-prob at [its slot, k]: read when the row finishes
        self.logprobs = torch.zeros((0, self.steps), device=model.device)
        self.slot: dict[int, int] = {}  # row -> its slot in self.logprobs
        self.free_slots: list[int] = []
        self.slots = HiddenSlots(self.steps) if hidden else None
        self.never = torch.zeros((), dtype=torch.bool, device=model.device)
        self.waiting: deque[int] = deque()
        self.batch = RunningBatch()

    def submit(self, prompts: list[str], seeds: Sequence[int] | None = None,
               groups: Sequence | None = None, checks: Sequence | None = None) -> list[int]:
        """Queue rows (chat-templated prompts, one generator seed each or None, one group each
        or None, one check each or None: see `generate`); their ids."""
        for name, values in (("seeds", seeds), ("groups", groups), ("checks", checks)):
            if values is not None and len(values) != len(prompts):
                raise ValueError(f"{len(values)} {name} for {len(prompts)} prompts")
        ids = list(range(len(self.prompts), len(self.prompts) + len(prompts)))
        self.prompts += prompts
        self.rows += [Row([], [], group=g, check=c) for g, c in
                      zip(groups or [None] * len(prompts), checks or [None] * len(prompts))]
        self.prompt_ids += [[] for _ in prompts]
        self.generators += ([None] * len(prompts) if seeds is None else
                            [torch.Generator().manual_seed(int(s) % 2**63) for s in seeds])
        missing = len(prompts) - len(self.free_slots)
        if missing > 0:  # grow by at least half, so a long search copies the buffer rarely
            have = len(self.logprobs)
            more = max(missing, have // 2)
            self.logprobs = torch.cat([self.logprobs, self.logprobs.new_zeros((more, self.steps))])
            self.free_slots += range(have + more - 1, have - 1, -1)
        for r in ids:  # a reused slot's old values are never read: each column is written first
            self.slot[r] = self.free_slots.pop()
        # Similar lengths side by side waste less compute on padding.
        self.waiting.extend(sorted(ids, key=lambda i: len(self.prompts[i])))
        return ids

    @property
    def busy(self) -> bool:
        """Rows are waiting or decoding."""
        return bool(self.waiting or self.batch.live)

    @torch.no_grad()
    def advance(self, batch_size: int) -> list[int]:
        """Decode until at least one row finishes (or none is left); the rows that finished,
        whose `result` is now final."""
        if not self.steps:  # max_new_tokens=0: nothing to run
            finished, self.waiting = list(self.waiting), deque()
            self._read_logprobs(finished)
            return finished
        finished: list[int] = []
        while not finished and self.busy:
            if self.batch.wants_rows(batch_size, len(self.waiting), self.can_join):
                self._join(self.batch, _next_group(self.waiting, batch_size - len(self.batch.live)))
            finished = self._step(self.batch)
        self._read_logprobs(finished)
        return finished

    def result(self, r: int) -> Generation:
        return row_result(self.tokenizer, self.rows[r], self.rule.stop)

    def take(self, r: int) -> Generation:
        """A finished row's result; the decoder forgets the row."""
        out = self.result(r)
        self.rows[r] = self.prompts[r] = self.prompt_ids[r] = self.generators[r] = None
        return out

    def _read_logprobs(self, finished: list[int]) -> None:
        if not finished:
            return
        slots = [self.slot.pop(r) for r in finished]
        for r, lps in zip(finished, self.logprobs[slots].tolist()):
            self.rows[r].logprobs = lps[:len(self.rows[r].tokens)]
        self.free_slots += slots

    def _join(self, batch: RunningBatch, group: list[int]) -> None:
        start = prefill(self.model, self.tokenizer, [self.prompts[i] for i in group], self.store,
                        self.hidden)
        for k, r in enumerate(group):
            self.prompt_ids[r] = start.prompt_ids[k]
        for r, h in zip(group, start.hidden.cpu() if self.hidden else []):
            self.rows[r].prompt_hidden = h
        batch.join(start, group)

    def _step(self, batch: RunningBatch) -> list[int]:
        """Choose every running row's next token; the rows that stop leave. Returns them."""
        rule, rows, live, device = self.rule, self.rows, batch.live, batch.logits.device
        in_rollout = torch.tensor([rows[r].boundary >= 0 for r in live], device=device)
        chosen = _choose(batch.logits, in_rollout, rule, self.temperature, self.top_p,
                         _uniforms(live, self.generators))
        cols = torch.tensor([len(rows[r].tokens) for r in live], device=device)
        self.logprobs[torch.tensor([self.slot[r] for r in live], device=device), cols] = (
            torch.log_softmax(batch.logits, dim=-1).gather(1, chosen[:, None]).squeeze(1))
        newline = torch.isin(chosen, rule.newline_ids) if rule.newline_ids is not None else self.never
        flags = torch.stack([chosen, torch.isin(chosen, rule.eos_ids).long(),
                             newline.long().expand_as(chosen)]).tolist()  # the step's one sync
        keep, stopped = [], []
        for j, (r, token, eos, nl) in enumerate(zip(live, *flags)):
            row, in_option = rows[r], rows[r].boundary < 0
            row.tokens.append(token)
            ends = row_ends(row, rule, bool(eos), bool(nl)) or len(row.tokens) >= self.steps
            if not ends and in_option and row.boundary >= 0 and self._repeats(r):
                row.cut = ends = True
            (stopped if ends else keep).append(j)
        if self.hidden:  # every row feeds its token: the stopped ones for their last hidden state
            batch.mask, batch.logits, states = _forward(self.model, batch.cache, batch.mask, chosen, True)
            self.slots.write(live, cols, states)
            self._read_hidden([live[j] for j in stopped])
        for j in stopped if self.keep_kv is not None else []:
            retire(self.keep_kv, batch.cache, j, batch.mask[j], self.prompt_ids[live[j]],
                   rows[live[j]].tokens)
        select = batch.keep(keep)
        if batch.live and not self.hidden:
            chosen = chosen if select is None else chosen[select]
            batch.mask, batch.logits, _ = _forward(self.model, batch.cache, batch.mask, chosen, False)
        return [live[j] for j in stopped]

    def _repeats(self, r: int) -> bool:
        """Row r just ended its option, which an earlier row of its group already wrote."""
        row = self.rows[r]
        return (self.claims is not None and row.group is not None and
                not self.claims.claim(row.group, tuple(row.tokens[:row.boundary + 1]), (self.epoch, r)))

    def _read_hidden(self, stopped: list[int]) -> None:
        """Each stopped row's hidden state at its option's and its own last text token (not a
        final EOS; where no text token precedes it, the prompt's last token)."""
        if not stopped:
            return

        def last_text(row: Row, length: int) -> int:
            return length - 1 - (row.eos and length == len(row.tokens))

        at = [(last_text(self.rows[r], self.rows[r].option_len),
               last_text(self.rows[r], len(self.rows[r].tokens))) for r in stopped]
        picked = self.slots.read([(r, max(o, 0), max(e, 0)) for r, (o, e) in zip(stopped, at)])
        for r, (option, end), (o, e) in zip(stopped, picked, at):
            row = self.rows[r]
            row.option_hidden = option if o >= 0 else row.prompt_hidden
            row.end_hidden = end if e >= 0 else row.prompt_hidden


def _next_group(waiting: deque, free: int) -> list[int]:
    """The next rows to join: as many as are free (at least one), so the batch never holds more
    than batch_size rows. Rows of one prompt are adjacent in the waiting order, so they mostly
    join together and share one prefill; one split at the group's edge prefills its prompt
    again, past what the prefix cache holds."""
    return [waiting.popleft() for _ in range(min(max(free, 1), len(waiting)))]


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


def _choose(logits: torch.Tensor, in_rollout: torch.Tensor, rule: Rule, temperature: float,
            top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Each live row's next token: its option's sample, or once past the boundary its rollout's
    (the same draw when the two temperatures agree, greedy at rollout temperature 0)."""
    sampled = _sample(logits, temperature, top_p, uniform)
    rolled = (sampled if rule.rollout_temperature == temperature else
              _sample(logits, rule.rollout_temperature, top_p, uniform))
    return torch.where(in_rollout, rolled, sampled)


def _forward(model, cache, mask: torch.Tensor, chosen: torch.Tensor, hidden: bool):
    """Run the chosen tokens through the model: the extended mask, the next logits and, with
    `hidden`, the hidden state at each chosen token."""
    mask = torch.cat([mask, mask.new_ones((len(chosen), 1))], dim=1)
    positions = mask.sum(-1, keepdim=True) - 1
    logits, last = forward_last(model, hidden, cache, input_ids=chosen[:, None],
                                attention_mask=mask, position_ids=positions)
    return mask, logits, last


def _uniforms(live: list[int], generators: list) -> torch.Tensor:
    """One uniform per live row for this step, from the row's own generator (None: the global
    generator; all rows of an unseeded call draw theirs at once)."""
    if all(generators[r] is None for r in live):
        return torch.rand(len(live))
    return torch.cat([torch.rand(1, generator=generators[r]) for r in live])


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
