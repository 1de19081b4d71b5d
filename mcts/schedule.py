"""How the trees' requests reach the models: each tree's search is a generator that yields
its requests and is resumed with their results, and `drive` batches what the trees ask.

A tree's search yields (Ask.expand, requests), (Ask.evaluate, requests) or (Ask.reward,
requests) and receives the callback's results for exactly those requests. A tree's requests
and seeds depend on its own state alone, so the trees come out the same however the requests
are batched; only the wall time differs.

- Evaluations and verifier rewards: `drive` resumes every tree that is ready, gathers what
  they ask into one `evaluate_fn` call and one `terminal_reward_fn` call, and repeats until
  each ready tree waits on an expansion (or is done).
- Expansions go to an `Expander`. `BatchedExpander` answers every submitted request in one
  `expand_fn` call (rounds in lock-step: a round's call lasts until its longest row ends).
  A streaming expander (pipeline.decoding.streaming) decodes them in one running batch and
  hands a tree back as soon as its own rows end, so a tree's next round joins the batch while
  other trees' rows still decode.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator
from typing import Protocol

from mcts.types import EvalRequest, EvaluateFn, ExpandFn, ExpandRequest, Option, TerminalRewardFn


class Ask(enum.Enum):
    expand = "expand"
    evaluate = "evaluate"
    reward = "reward"


TreeRun = Generator[tuple[Ask, list], list, None]  # one tree's search


class Expander(Protocol):
    def submit(self, ticket: int, requests: list[ExpandRequest]) -> None:
        """Start sampling these requests' options; `ticket` names them in `poll`."""

    def poll(self) -> list[tuple[int, list[list[Option]]]]:
        """Block until at least one submitted ticket is complete; those tickets with their
        option lists (one per request, in order). Each ticket is returned once."""


class BatchedExpander:
    """Every submitted request in one `expand_fn` call per poll."""

    def __init__(self, expand_fn: ExpandFn):
        self.expand_fn = expand_fn
        self.submitted: list[tuple[int, list[ExpandRequest]]] = []

    def submit(self, ticket: int, requests: list[ExpandRequest]) -> None:
        self.submitted.append((ticket, requests))

    def poll(self) -> list[tuple[int, list[list[Option]]]]:
        batch, self.submitted = self.submitted, []
        results = self.expand_fn([r for _, requests in batch for r in requests])
        asked = sum(len(requests) for _, requests in batch)
        if len(results) != asked:
            raise ValueError(f"expand_fn returned {len(results)} option lists for {asked} requests")
        return _shares(batch, results)


def drive(runs: list[TreeRun], expander: Expander, evaluate_fn: EvaluateFn,
          terminal_reward_fn: TerminalRewardFn | None) -> None:
    """Run every tree's search to its end."""
    callbacks: dict[Ask, Callable[[list[EvalRequest]], list]] = {Ask.evaluate: evaluate_fn}
    if terminal_reward_fn is not None:
        callbacks[Ask.reward] = terminal_reward_fn
    ready: list[tuple[int, list | None]] = [(i, None) for i in range(len(runs))]
    expanding = 0
    while ready or expanding:
        while ready:
            asks: dict[Ask, list[tuple[int, list]]] = {Ask.evaluate: [], Ask.reward: []}
            for i, sent in ready:
                try:
                    ask, requests = runs[i].send(sent)
                except StopIteration:
                    continue
                if ask == Ask.expand:
                    expander.submit(i, requests)
                    expanding += 1
                else:
                    asks[ask].append((i, requests))
            ready = [answer for ask, waiting in asks.items() if waiting
                     for answer in _answer(callbacks[ask], ask, waiting)]
        if expanding:
            done = expander.poll()
            expanding -= len(done)
            ready = done


def _answer(fn: Callable[[list[EvalRequest]], list], ask: Ask,
            waiting: list[tuple[int, list]]) -> list[tuple[int, list]]:
    """One call for every waiting tree's requests; each tree's share of the results."""
    results = fn([r for _, requests in waiting for r in requests])
    asked = sum(len(requests) for _, requests in waiting)
    if len(results) != asked:
        name = "evaluate_fn" if ask == Ask.evaluate else "terminal_reward_fn"
        raise ValueError(f"{name} returned {len(results)} results for {asked} requests")
    return _shares(waiting, results)


def _shares(asked: list[tuple[int, list]], results: list) -> list[tuple[int, list]]:
    """Cut one call's results back into each asker's share, in the order they asked."""
    out, k = [], 0
    for key, requests in asked:
        out.append((key, list(results[k:k + len(requests)])))
        k += len(requests)
    return out
