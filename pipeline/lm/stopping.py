"""Where a decoding row stops, and what it becomes: EOS, the option boundary (a stop rule,
checked on the new tokens only), the option cap (never mid-word), the fused rollout after the
boundary, a repeated option (`OptionClaims`); then the row's `Generation` (option text,
rollout text, log-probs, hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import torch

from mcts.options import word_starts


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
    # With rollout_tokens > 0: the continuation after the boundary (the fast rollout: sampled
    # at the rollout temperature, or greedy at 0).
    rollout: str = ""
    rollout_logprobs: list[float] | None = None
    rollout_ids: list[int] | None = None  # the rollout's tokens (a final EOS included)
    rollout_finished: bool = False
    # the row repeated an earlier row's option under the same node (`OptionClaims`), so it
    # stopped at its boundary: the search's merge drops it, and no rollout was decoded for it
    cut: bool = False
    # made by `replay` from tokens decoded (and counted) elsewhere, not decoded as a row
    replayed: bool = False
    # the step check (`Rule.wrong`) flagged a line, and the row stopped there: its option (or
    # whole sample) is a dead end, or (rollout_wrong) its rollout failed at that line
    wrong: bool = False
    rollout_wrong: bool = False
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


@dataclass
class Rule:
    """Where rows stop: EOS, the option boundary (+ optional rollout), the caps."""

    tokenizer: object
    eos_ids: torch.Tensor
    stop: StopRule | None
    newline_ids: torch.Tensor | None  # tokens holding a newline: the newline stop rule and the step check
    option_cap: int
    rollout_tokens: int
    final: object
    rollout_temperature: float = 0.0  # 0: the rollout is greedy
    # a step check on a finished line (e.g. pipeline.tasks.equations.false_equation): a row
    # stops at the first line it flags, an option at its boundary, a rollout or a whole sample
    # at that line's newline or EOS; None: no check
    wrong: object = None


@dataclass
class Row:
    tokens: list[int]
    logprobs: list[float]  # filled at the end of the call (recorded on the device meanwhile)
    boundary: int = -1  # index of the option's last token; -1 while still in the option
    eos: bool = False
    text: str = ""  # text rules only: the decoded option so far, extended token by token
    prefix_at: int = 0  # incremental decoding window: tokens[prefix_at:read_at] are context
    read_at: int = 0
    prompt_hidden: torch.Tensor | None = None  # hidden=True only: see Generation
    option_hidden: torch.Tensor | None = None
    end_hidden: torch.Tensor | None = None
    group: object = None  # rows of one group (a tree's node) may repeat each other's options
    cut: bool = False  # stopped at its boundary as a repeat (see Generation.cut)
    line_at: int = 0  # the step check: where the line not checked yet starts
    wrong: bool = False  # stopped at its option (or whole sample) as the step check flagged it
    rollout_wrong: bool = False  # stopped at a rollout line the step check flagged
    # a check on the row's working so far (its text through the line just ended; e.g. a
    # training search's search.prune_steps), asked beside `Rule.wrong`; None: none
    check: object = None

    @property
    def option_len(self) -> int:
        return self.boundary + 1 if self.boundary >= 0 else len(self.tokens)


class OptionClaims:
    """Which row first wrote each option under each node. In search, a row whose option repeats
    an earlier row's token for token under the same node is a duplicate that the merge drops
    (identical text is a duplicate at any threshold up to 1), and so is the rollout fused after
    it: the row stops at its boundary instead. Every Decoder of one search shares one
    `OptionClaims`; each takes an epoch, so a later call's rows come after an earlier call's,
    as its options reach the merge after theirs."""

    def __init__(self) -> None:
        self.first: dict[tuple, tuple[int, int]] = {}  # (group, option tokens) -> (epoch, row)
        self.epochs = 0

    def epoch(self) -> int:
        self.epochs += 1
        return self.epochs

    def claim(self, group: object, option: tuple[int, ...], order: tuple[int, int]) -> bool:
        """True: no row before `order` wrote this option under `group` (the row goes on)."""
        held = self.first.get((group, option))
        if held is not None and held < order:
            return False
        self.first[(group, option)] = order
        return True


def row_ends(row: Row, rule: Rule, eos: bool, newline: bool) -> bool:
    """Update the row after its newest token; True when it stops generating."""
    checked = rule.wrong is not None or row.check is not None
    if eos:
        row.eos = True
        if checked:
            flags_line(rule, row)  # the last line: of the rollout, the option or the sample
        return True
    n = len(row.tokens)
    if row.boundary >= 0:  # in the rollout
        if newline and checked and flags_line(rule, row):
            return True
        return n - 1 - row.boundary >= rule.rollout_tokens
    if rule.stop is None:
        if newline and checked and flags_line(rule, row):
            return True
        return n >= rule.option_cap
    if rule.stop.kind == "newline":  # decode only at a newline (leading newlines are no end)
        at_boundary = newline and rule.stop.ends(row_text(rule, row))
    else:  # a text rule: decode only the new token(s), then ask the rule
        extend_text(rule.tokenizer, row)
        at_boundary = rule.stop.ends(row.text)
    if not (at_boundary or n >= rule.option_cap):
        return False
    row.boundary = n - 1 if at_boundary else last_word_end(rule.tokenizer, row.tokens)
    option = rule.stop.cut(row_text(rule, row, row.boundary + 1))
    if (rule.wrong is not None and rule.wrong(option)) or (row.check is not None
                                                           and row.check(option)):
        row.wrong = True  # a dead end: no rollout after it
        return True
    if rule.rollout_tokens == 0:
        return True
    return bool(rule.final(option))


def flags_line(rule: Rule, row: Row) -> bool:
    """The step check on the line the newest token ended (decoded from `row.line_at`, or from
    the rollout's start), and the row's own check on its text so far: True, and the row is
    marked, when either flags it."""
    start = max(row.line_at, row.boundary + 1)
    row.line_at = len(row.tokens)
    flagged = bool(rule.wrong is not None and rule.wrong(
        rule.tokenizer.decode(row.tokens[start:], skip_special_tokens=True))
        or row.check is not None and row.check(row_text(rule, row)))
    if row.boundary >= 0:
        row.rollout_wrong = flagged
    else:
        row.wrong = flagged
    return flagged


def last_word_end(tokenizer, tokens: list[int]) -> int:
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


def extend_text(tokenizer, row: Row) -> None:
    """Incremental detokenization (as vLLM's): decode a short window of tokens with one token of
    left context, so leading spaces and multi-byte characters split over tokens come out as in
    a decode of the whole row; text is only appended once it is not a partial character."""
    before = tokenizer.decode(row.tokens[row.prefix_at:row.read_at], skip_special_tokens=True)
    after = tokenizer.decode(row.tokens[row.prefix_at:], skip_special_tokens=True)
    if len(after) > len(before) and not after.endswith("\ufffd"):
        row.text += after[len(before):]
        row.prefix_at, row.read_at = row.read_at, len(row.tokens)


def row_text(rule: Rule, row: Row, length: int | None = None) -> str:
    return rule.tokenizer.decode(row.tokens[:length], skip_special_tokens=True)


def row_result(tokenizer, row: Row, stop: StopRule | None) -> Generation:
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
        rollout_logprobs=row.logprobs[option_len:], rollout_ids=rollout_ids,
        rollout_finished=row.eos and bool(rollout_ids),
        cut=row.cut, wrong=row.wrong, rollout_wrong=row.rollout_wrong,
        prompt_hidden=row.prompt_hidden, option_hidden=row.option_hidden, end_hidden=row.end_hidden,
    )




def replay(rule: Rule, tokens: list[int], logprobs: list[float], check=None) -> Generation:
    """The Generation a row decoding exactly `tokens` (with their log-probs, and its own `check`,
    as `Row.check`) would end as under `rule`: its option to the first boundary, then its
    rollout. A node's own rollout, replayed, is a sample of its first step and that step's
    rollout (`search.reuse_rollouts`)."""
    eos_ids, row = set(rule.eos_ids.tolist()), Row([], [], check=check)
    newline_ids = set(rule.newline_ids.tolist()) if rule.newline_ids is not None else set()
    for token in tokens:
        row.tokens.append(token)
        if row_ends(row, rule, token in eos_ids, token in newline_ids):
            break
    row.logprobs = list(logprobs[:len(row.tokens)])
    return replace(row_result(rule.tokenizer, row, rule.stop), replayed=True)
