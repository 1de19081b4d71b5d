"""The visit and widening rules of mcts.search on a synthetic problem with known answers.

    python benchmarks/search_rules.py [--trees 400] [--simulations 16] [--seeds 0 1]

No model: every node has a latent success probability p (the root's uniform in [0.1, 0.6],
a child's its parent's plus Gaussian noise 0.25); from depth 1 on about 30% of options are
answers, right with the state's p. The critic sees p plus Gaussian noise sigma and half-knows
an answer (0.5 p + 0.5 if right): no verifier, as at evaluation time. Score: the expected
correctness of the most-visited path's leaf (1 or 0 at an answer, p elsewhere).
Rules compared: the old backup (each new child backs up one visit along its whole path),
the new one (one visit per simulation), each with widening "first" or "puct".
Prints a table; writes nothing (seconds on a CPU).
"""

from __future__ import annotations

import argparse
import importlib
import random
import zlib

from mcts import LeafEval, Option, SearchParams, search

search_module = importlib.import_module("mcts.search")  # `mcts.search` is also the function
NEW_BACKUP = search_module._backup_leaf


def _h(*parts: object) -> int:
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


class World:
    """Latent p per (tree, steps); the policy and the critic of the synthetic problem."""

    def __init__(self, sigma: float):
        self.sigma = sigma
        self.p: dict = {}

    def latent(self, t: int, steps: list[str]) -> float:
        key = (t, tuple(steps))
        if key not in self.p:
            if not steps:
                self.p[key] = random.Random(_h("root", t)).uniform(0.1, 0.6)
            else:
                drift = random.Random(_h("p", t, *steps)).gauss(0, 0.25)
                self.p[key] = min(1.0, max(0.0, self.latent(t, steps[:-1]) + drift))
        return self.p[key]

    def policy(self, requests):
        return [[self._option(r, k) for k in range(r.num_options)] for r in requests]

    def _option(self, r, k: int) -> Option:
        rng = random.Random(_h("opt", r.tree_index, r.seed, k, *r.steps))
        if len(r.steps) >= 1 and rng.random() < 0.3:
            right = rng.random() < self.latent(r.tree_index, r.steps)
            text = f"Answer: {'right' if right else 'wrong'} {rng.randrange(10**6)}\n"
            return Option(text, -rng.uniform(0.5, 3.0), 3, True)
        return Option(f"step {len(r.steps)} {rng.randrange(10**6)}\n", -rng.uniform(0.5, 3.0), 3, False)

    def critic(self, requests):
        return [LeafEval(total=self._value(r)) for r in requests]

    def _value(self, r) -> float:
        last = r.steps[-1] if r.steps else ""
        if r.terminal and last.startswith("Answer:"):
            p = 0.5 * self.latent(r.tree_index, r.steps[:-1]) + (0.5 if "right" in last else 0.0)
        else:
            p = self.latent(r.tree_index, r.steps)
        noise = random.Random(_h("noise", r.tree_index, *r.steps)).gauss(0, self.sigma)
        return min(1.0, max(0.0, p + noise))

    def score(self, tree) -> float:
        leaf = tree.best_trajectory()[-1]
        if tree.terminal[leaf] and tree.text[leaf].startswith("Answer:"):
            return 1.0 if "right" in tree.text[leaf] else 0.0
        return self.latent(tree.tree_index, tree.steps(leaf))


def old_backup(leaf) -> None:
    """The rule before issue 14: every new child backs up one visit along its whole path."""
    tree = leaf.tree
    if leaf.num_new == 0 and tree.total[leaf.node] is not None:
        tree.backup(leaf.node, tree.total[leaf.node])
    for child in leaf.new_children:
        tree.backup(child, tree.total[child])


RULES = (("old visits, widen first", old_backup, "first"),
         ("new visits, widen first", NEW_BACKUP, "first"),
         ("new visits, widen by PUCT", NEW_BACKUP, "puct"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", type=int, default=400)
    ap.add_argument("--simulations", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    print("| critic noise | rule | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|---|" + "---|" * len(args.seeds))
    for sigma in (0.15, 0.3):
        for name, backup, widening in RULES:
            search_module._backup_leaf = backup
            accs = []
            for seed in args.seeds:
                world = World(sigma)
                trees = search([f"p{i}" for i in range(args.trees)], world.policy, world.critic,
                               SearchParams(simulations=args.simulations, max_depth=6,
                                            widening=widening, seed=seed))
                accs.append(sum(world.score(t) for t in trees) / len(trees))
            print(f"| {sigma} | {name} | " + " | ".join(f"{a:.3f}" for a in accs) + " |")
    search_module._backup_leaf = NEW_BACKUP


if __name__ == "__main__":
    main()
