"""Termination functions: where one option (a step of the solution) ends.

Pure text predicates for the generation layer: while decoding an option it asks `ends(text)`
on the text generated so far, and keeps `cut(text)` as the option (tokens past the boundary
are discarded). `max_tokens` caps every kind; for "token_cap" it is the only end. At the cap
the generation layer backs the option off to its last word boundary (`word_starts`), so a cap
never cuts a word.

Real boundaries only: leading whitespace is never an option's end (an option that would be
just "\n" is not an option: the newline joins the next step's text), and a boundary newline
takes the whole run of newlines after it ("\n\n" is one BPE token in SmolLM2; cutting after
its first newline would drop the second from the text while the token stays).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

KINDS = ("newline", "sentence", "step_marker", "token_cap")

# A sentence ends at . ! or ? followed by whitespace (so "3.14" does not end it), or at a newline.
_SENTENCE_END = re.compile(r"[.!?]\s|\n")


@dataclass(frozen=True)
class OptionEnd:
    kind: str = "newline"
    regex: str | None = None  # step_marker only: the marker that starts each step, e.g. r"Step \d+:"
    max_tokens: int = 128

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown option end kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if self.kind == "step_marker":
            if not self.regex:
                raise ValueError("option end kind 'step_marker' needs a regex")
            re.compile(self.regex)  # fail at config time, not mid-search
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def ends(self, new_text: str) -> bool:
        """Has the generated text reached an option boundary?"""
        return self._boundary(new_text) is not None

    def cut(self, new_text: str) -> str:
        """The option text up to and including the boundary (all of it if there is none)."""
        end = self._boundary(new_text)
        return new_text if end is None else new_text[:end]

    def _boundary(self, text: str) -> int | None:
        """Index just past the option's last character, or None if the option goes on."""
        content = len(text) - len(text.lstrip())  # leading whitespace never ends an option
        if self.kind == "newline":
            i = text.find("\n", content)
            return None if i < 0 else _newline_run_end(text, i + 1)
        if self.kind == "sentence":
            m = _SENTENCE_END.search(text, content)
            if m is None:
                return None
            return _newline_run_end(text, m.end()) if text[m.end() - 1] == "\n" else m.end()
        if self.kind == "step_marker":
            return self._next_marker(text)
        return None  # token_cap: the caller stops at max_tokens

    def _next_marker(self, text: str) -> int | None:
        # The option's own leading marker is not its end; the next one is, and belongs to the next option.
        own_start = len(text) - len(text.lstrip())
        for m in re.finditer(self.regex, text):
            if m.start() > own_start:
                return m.start()
        return None


def _newline_run_end(text: str, end: int) -> int:
    """Past the newlines that directly follow a boundary at `end`."""
    while end < len(text) and text[end] == "\n":
        end += 1
    return end


def word_starts(piece: str, previous: str) -> bool:
    """Does a token whose text is `piece`, after one whose text is `previous`, start a new word
    (so an option may end just before it)? Yes after whitespace, or if it starts with whitespace."""
    return piece[:1].isspace() or previous[-1:].isspace()


def newline(max_tokens: int = 128) -> OptionEnd:
    return OptionEnd("newline", None, max_tokens)


def sentence_end(max_tokens: int = 128) -> OptionEnd:
    return OptionEnd("sentence", None, max_tokens)


def step_marker(regex: str, max_tokens: int = 128) -> OptionEnd:
    return OptionEnd("step_marker", regex, max_tokens)


def token_cap(max_tokens: int = 32) -> OptionEnd:
    return OptionEnd("token_cap", None, max_tokens)


def is_answer_line(text: str) -> bool:
    """Does the text give a final answer? A line starting with "Answer:" (any case, after
    whitespace or markdown bold), or any "####" or "\\boxed{"; such an option is terminal."""
    if "####" in text or "\\boxed{" in text:
        return True
    return any(line.lstrip(" \t*").lower().startswith("answer:") for line in text.splitlines())
