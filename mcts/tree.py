"""The search tree as parallel lists indexed by node id (root = ROOT_INDEX), like mctx's Tree of
arrays.

Lists instead of node objects keep the tree one flat JSON record and make each per-node
quantity easy to scan; append-only, so a node id never changes. Visits, value sums and the
min/max Q have one writer, `Tree.backup`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

JSON_VERSION = 1
ROOT_INDEX = 0  # the root's node id
NO_PARENT = -1  # the root's parent


@dataclass
class MinMaxStats:
    """The min and max Q seen in one tree; None until the first backup."""

    minimum: float | None = None
    maximum: float | None = None

    def update(self, q: float) -> None:
        self.minimum = q if self.minimum is None else min(self.minimum, q)
        self.maximum = q if self.maximum is None else max(self.maximum, q)

    def normalize(self, q: float) -> float:
        # No spread yet: every Q is as good as every other, so sit in the middle.
        if self.minimum is None or self.maximum is None or self.maximum <= self.minimum:
            return 0.5
        return (q - self.minimum) / (self.maximum - self.minimum)


@dataclass
class TreeStats:
    simulations: int = 0  # selections resolved (expansions, revisits of terminal nodes) = root visits
    tokens_generated: int = 0  # option tokens from expand_fn, duplicates included
    evaluator_tokens: int = 0  # fast rollouts: Option.rollout_tokens and LeafEval.tokens summed
    merges: int = 0  # duplicate options seen (each resampled or dropped)
    reused: int = 0  # options read off their node's rollout, not decoded (Option.reused)
    seconds: float = 0.0  # wall time from search start until this tree was done
    stop_reason: str = ""  # "simulations" | "token_budget" | "exhausted"
    reopens: int = 0  # times the root was asked for one more child (SearchParams.reopen_root)

    @property
    def total_tokens(self) -> int:
        """What the token budget counts."""
        return self.tokens_generated + self.evaluator_tokens


class Tree:
    def __init__(self, prompt: str, tree_index: int = 0):
        self.prompt = prompt
        self.tree_index = tree_index
        self.stats = TreeStats()
        self.minmax = MinMaxStats()
        # Per node, indexed by node id; shape [num_nodes] unless noted.
        self.parent: list[int] = []  # NO_PARENT for the root
        self.children: list[list[int]] = []  # [num_nodes][num_children], in creation order
        self.depth: list[int] = []  # root = 0; a node's depth = number of options from the root
        self.text: list[str] = []  # the option text ("" for the root)
        self.num_tokens: list[int] = []
        self.logprob: list[float] = []  # summed token log-probs of the option
        self.prior: list[float] = []  # softmax over siblings of logprob / num_tokens
        self.visits: list[int] = []
        self.value_sum: list[float] = []  # sum of backed-up values
        self.total: list[float | None] = []  # evaluated value v(s): LeafEval.total or terminal reward
        self.value: list[float] = []  # LeafEval parts, for inspection and critic training
        self.prm: list[float] = []
        self.orm: list[float] = []
        self.rollout: list[float] = []
        self.terminal: list[bool] = []  # answer line, EOS, depth cap, or a dead end (no options)
        self.terminal_reward: list[float | None] = []  # verifier reward (training only)
        self.merges: list[int] = []  # duplicate children seen when expanding this node
        # options sampled at the parent that are this node: 1 + the duplicates merged into it,
        # so a node's children's draws sum to its sampled options (len(children) + merges)
        self.draws: list[int] = []
        self.dead_end: list[bool] = []  # the option was rejected (Option.dead_end): terminal, worth 0
        self.expand_target: list[int] = []  # n(s): children wanted; 0 = never expanded
        self.expand_requests: list[int] = []  # expand requests made for this node (seeds resamples)
        self.pending: list[int] = []  # selections in flight through this node (virtual loss); transient
        self.add_node(parent=NO_PARENT, text="", num_tokens=0, logprob=0.0, terminal=False)

    # --- building ---

    @property
    def num_nodes(self) -> int:
        return len(self.parent)

    def add_node(self, parent: int, text: str, num_tokens: int, logprob: float, terminal: bool) -> int:
        node = self.num_nodes
        self.parent.append(parent)
        self.children.append([])
        self.depth.append(0 if parent == NO_PARENT else self.depth[parent] + 1)
        self.text.append(text)
        self.num_tokens.append(num_tokens)
        self.logprob.append(logprob)
        self.prior.append(1.0)
        self.visits.append(0)
        self.value_sum.append(0.0)
        self.total.append(None)
        for parts in (self.value, self.prm, self.orm, self.rollout):
            parts.append(0.0)
        self.terminal.append(terminal)
        self.terminal_reward.append(None)
        self.merges.append(0)
        self.draws.append(1)
        self.dead_end.append(False)
        self.expand_target.append(0)
        self.expand_requests.append(0)
        self.pending.append(0)
        if parent != NO_PARENT:
            self.children[parent].append(node)
        return node

    def backup(self, node: int, value: float, *, path: bool = True) -> None:
        """One visit of value `value` along the path root..node (path=False: on `node` alone,
        a new child's first visit); the tree's only writer of visits, value sums and min/max Q."""
        for n in self.path(node) if path else [node]:
            self.visits[n] += 1
            self.value_sum[n] += value
            self.minmax.update(self.q(n))

    # --- reading ---

    def q(self, node: int) -> float:
        """Mean backed-up value; 0.0 while unvisited."""
        return self.value_sum[node] / self.visits[node] if self.visits[node] else 0.0

    def path(self, node: int) -> list[int]:
        """Node ids from the root to `node`, both included."""
        ids = []
        while node != NO_PARENT:
            ids.append(node)
            node = self.parent[node]
        return ids[::-1]

    def steps(self, node: int) -> list[str]:
        """Option texts from the root to `node` (the root has none)."""
        return [self.text[i] for i in self.path(node)[1:]]

    def node_value(self, node: int) -> float:
        """v(s) for branching: the evaluated value; a node never evaluated (a hand-built root)
        takes the mean of its children's."""
        if self.total[node] is not None:
            return self.total[node]
        values = [self.total[c] for c in self.children[node] if self.total[c] is not None]
        return sum(values) / len(values) if values else 0.0

    def wants_children(self, node: int) -> bool:
        """Not terminal, and never expanded or below its importance-based target n(s)."""
        if self.terminal[node]:
            return False
        return self.expand_target[node] == 0 or self.expand_target[node] > len(self.children[node])

    def has_expandable(self) -> bool:
        return any(self.wants_children(n) for n in range(self.num_nodes))

    def best_trajectory(self, rule: PathRule | None = None) -> list[int]:
        """Node ids root..leaf following, at each level, the visited child that `rule` ranks
        highest (default `most_visited`; `highest_q`); ties go to the first child."""
        rule = rule or most_visited
        node, ids = ROOT_INDEX, [ROOT_INDEX]
        while True:
            candidates = [c for c in self.children[node] if self.visits[c] > 0]
            if not candidates:
                return ids
            node = max(candidates, key=lambda c: rule(self, c))  # max keeps the first of equals
            ids.append(node)

    def trajectory_text(self, ids: list[int]) -> str:
        return "".join(self.text[i] for i in ids)

    # --- JSON (never pickle) ---

    def to_json(self) -> dict:
        best_visits, best_q = self.best_trajectory(most_visited), self.best_trajectory(highest_q)
        return {
            "version": JSON_VERSION,
            "prompt": self.prompt,
            "tree_index": self.tree_index,
            "stats": asdict(self.stats),
            "q_min": self.minmax.minimum,
            "q_max": self.minmax.maximum,
            "best_trajectory": best_visits,
            "best_text": self.trajectory_text(best_visits),
            "best_trajectory_q": best_q,
            "best_text_q": self.trajectory_text(best_q),
            "nodes": [self._node_json(n) for n in range(self.num_nodes)],
        }

    def _node_json(self, n: int) -> dict:
        return {
            "id": n,
            "parent": self.parent[n],
            "depth": self.depth[n],
            "text": self.text[n],
            "num_tokens": self.num_tokens[n],
            "logprob": self.logprob[n],
            "prior": self.prior[n],
            "visits": self.visits[n],
            "value_sum": self.value_sum[n],
            "q": self.q(n),
            "total": self.total[n],
            "value": self.value[n],
            "prm": self.prm[n],
            "orm": self.orm[n],
            "rollout": self.rollout[n],
            "terminal": self.terminal[n],
            "terminal_reward": self.terminal_reward[n],
            "merges": self.merges[n],
            "draws": self.draws[n],
            "dead_end": self.dead_end[n],
            "expand_target": self.expand_target[n],
            "expand_requests": self.expand_requests[n],
        }

    @classmethod
    def from_json(cls, data: dict) -> Tree:
        if data.get("version") != JSON_VERSION:
            raise ValueError(f"tree JSON version {data.get('version')!r}, expected {JSON_VERSION}")
        tree = cls(data["prompt"], data["tree_index"])
        tree.stats = TreeStats(**data["stats"])
        tree.minmax = MinMaxStats(data["q_min"], data["q_max"])
        nodes = data["nodes"]
        for row in nodes[1:]:  # the constructor made the root; ids are creation order
            tree.add_node(row["parent"], row["text"], row["num_tokens"], row["logprob"], row["terminal"])
        for n, row in enumerate(nodes):
            if row["id"] != n:
                raise ValueError(f"tree JSON node {n} has id {row['id']}")
            tree.terminal[n] = row["terminal"]
            for name in ("prior", "visits", "value_sum", "total", "value", "prm", "orm", "rollout",
                         "terminal_reward", "merges", "expand_target", "expand_requests"):
                getattr(tree, name)[n] = row[name]
            tree.draws[n] = row.get("draws", 1)  # trees written before draws were counted: 1
            tree.dead_end[n] = row.get("dead_end", False)  # ... or before dead ends were marked
        return tree


PathRule = Callable[[Tree, int], float]  # (tree, child) -> rank among its visited siblings


def most_visited(tree: Tree, node: int) -> float:
    return tree.visits[node]


def highest_q(tree: Tree, node: int) -> float:
    return tree.q(node)
