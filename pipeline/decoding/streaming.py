"""Streaming expansions: every tree's option rows decode in one running batch, and a tree
resumes its search as soon as its own rows end (mcts.schedule.Expander).

With lock-step rounds (`search.stream=false`) each round's `generate` call lasts until its
longest row ends (an option to its cap plus a full rollout), while most rows end after a line,
so the batch runs half empty at every round's end, and merge retries decode in calls of their
own. Here a tree's next round, or its retry, joins the batch while other trees' rows still
decode. Each row keeps its own seed, so every tree comes out as in lock-step; only the
floating-point noise of a different batch composition can flip a near-tie.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

from mcts.types import ExpandRequest, Option
from pipeline.decoding.reuse import RolloutReuse, split_requests
from pipeline.lm.generation import Decoder

OptionsFn = Callable[[list[ExpandRequest], list[str], list], list[list[Option]]]


def option_seed(request_seed: int, k: int) -> int:
    """The sampling seed of a request's k-th option: a function of the request alone, so the
    options do not depend on which other requests share the batch."""
    return zlib.crc32(f"{request_seed}:{k}".encode())


def expansion_rows(requests: list[ExpandRequest]) -> tuple[list[str], list[int], list[tuple]]:
    """One row per option: its prompt (the tree's prompt and the node's steps), its seed and
    its group, the node (rows of one node may repeat each other's options: `OptionClaims`)."""
    prompts = [r.prompt + "".join(r.steps) for r in requests for _ in range(r.num_options)]
    return (prompts, [option_seed(r.seed, k) for r in requests for k in range(r.num_options)],
            [(r.tree_index, r.node_id) for r in requests for _ in range(r.num_options)])


class StreamingExpander:
    """The search's expansions through one `Decoder` (pipeline/lm/generation.py); `options`
    turns a request group's generations into its option lists (LeafScorer.options); `reuse`
    reads an option off a node's rollout instead of decoding it (search.reuse_rollouts)."""

    def __init__(self, decoder: Decoder, batch_size: int, options: OptionsFn,
                 reuse: RolloutReuse | None = None, checks=lambda requests: None):
        self.decoder, self.batch_size, self.options, self.reuse = decoder, batch_size, options, reuse
        self.checks = checks  # requests -> one check per row, or None (LeafScorer.row_checks)
        self.tickets: dict[int, tuple[list[ExpandRequest], list[ExpandRequest], list, list[int]]] = {}
        self.owner: dict[int, int] = {}  # row -> its ticket
        self.left: dict[int, int] = {}  # ticket -> rows still decoding

    def submit(self, ticket: int, requests: list[ExpandRequest]) -> None:
        fresh, taken = split_requests(self.reuse, requests)
        prompts, seeds, groups = expansion_rows(fresh)
        rows = self.decoder.submit(prompts, seeds, groups, self.checks(fresh))
        self.tickets[ticket] = (requests, fresh, taken, rows)
        self.left[ticket] = len(rows)
        for r in rows:
            self.owner[r] = ticket

    def poll(self) -> list[tuple[int, list[list[Option]]]]:
        done = [t for t, left in self.left.items() if left == 0]
        while not done:
            if not self.decoder.busy:
                raise RuntimeError("poll() with no expansion decoding")
            for r in self.decoder.advance(self.batch_size):
                ticket = self.owner.pop(r)
                self.left[ticket] -= 1
                if self.left[ticket] == 0:
                    done.append(ticket)
        out = []
        for ticket in done:
            requests, fresh, taken, rows = self.tickets.pop(ticket)
            del self.left[ticket]
            gens = RolloutReuse.join(fresh, taken, [self.decoder.take(r) for r in rows])
            out.append((ticket, self.options(requests, expansion_rows(requests)[0], gens)))
        return out
