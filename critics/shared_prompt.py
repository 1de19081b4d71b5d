"""One forward of a prompt for all the completions that share it.

A tree's nodes and rollouts all share one prompt, and so do a problem's best-of-N samples and
a node's sibling options. Run per text, the prompt is re-run once per completion; here it runs
once and its KV cache serves up to `batch_size` completions per forward, right-padded, with
positions that continue the prompt's: each completion sees exactly what a pass of its own would.
Critic features (critics.features) and teacher-forced log-probs (pipeline.lm.teacher_forced)
both read their hidden states from here.

The completions themselves share prefixes too: a tree node's text is its parent's plus one
option, and siblings share their parent's. Where the model allows it (`tree_attention_fits`),
the completions after one prompt run as a token tree (a trie of their ids) in one forward:
every tree token is input once, attends to the prompt and to its own ancestors only (a 4D
attention mask) and sits at the position it has in its own text, so each completion's states
are what a pass of its own would give. On the demo's search trees this inputs about half the
tokens that one row per completion does (README, benchmarks/critic_features.py).

The prompts themselves share a prefix too: a task's system prompt and worked example open every
problem's prompt (113 of the demo's ~135 tokens). `grouped_states` runs that common prefix once
(`shared_prefix`) and each prompt only past it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

Pair = tuple[list[int], list[int]]  # (prompt ids, completion ids)
Row = tuple[int, list[int]]  # (index into the caller's texts, completion ids)
# per row: (index, completion ids, states (1 + len(ids), hidden), log-probs (len(ids),) or None)
Scored = tuple[int, list[int], torch.Tensor, "torch.Tensor | None"]
NO_PARENT = -1  # a tree token right after the prompt
# Tree tokens per forward: its attention scores are (heads, tokens, prompt + tokens), mostly
# masked, so a wide tree costs attention a padded batch would not; 0 turns tree attention off.
TREE_TOKENS = 512
TREE_ATTENTION = ("sdpa", "eager")  # attention implementations that take a custom 4D mask
# Tokens: a prefix common to every prompt shorter than this is not worth a forward of its own
MIN_SHARED = 16
# Predictor rows projected to the vocabulary at once (SmolLM2's 49k-word float32 logits: 48 MB)
LOGIT_ROWS = 256

# id(model.config) -> (a weak reference to that config, every cache layer a plain DynamicLayer);
# the reference tells a live config from a freed one whose id a new config was given
_PLAIN_KV: dict[int, tuple[weakref.ref, bool]] = {}


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@functools.cache
def _cache_keyword(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def with_cache(module, cache) -> dict:
    """The KV cache as `module`'s forward takes it: `cache=` since transformers renamed it (the
    old `past_key_values=` warns and goes in 5.40), `past_key_values=` in older versions."""
    return {_cache_keyword(type(module).forward): cache}


def returned_cache(output):
    """The KV cache a forward returned (`output.cache`; `past_key_values` before the rename)."""
    return output.cache if "cache" in output else output.past_key_values


def plain_kv_layers(model) -> bool:
    """Are all of the model's KV cache layers plain full-attention ones (no sliding window), so
    that their KV can be sliced by position, padded and stacked across batches?"""
    config = model.config
    found = _PLAIN_KV.get(id(config))
    if found is None or found[0]() is not config:
        layers = DynamicCache(config=config).layers
        found = (weakref.ref(config), bool(layers) and all(type(x) is DynamicLayer for x in layers))
        _PLAIN_KV[id(config)] = found
    return found[1]


def tree_attention_fits(model) -> bool:
    """Can completions run as a token tree: full-attention layers (a sliding window would need
    its own mask) under an attention implementation that takes a custom 4D mask (not flash
    attention), and TREE_TOKENS > 0?"""
    return (TREE_TOKENS > 0 and plain_kv_layers(model)
            and getattr(model.config, "_attn_implementation", None) in TREE_ATTENTION)


def plain_lm_head(model):
    """The output embedding when logits are exactly lm_head(final hidden state), so that
    log-probs can be read from completion_states; None for a model without one, or one that
    scales or soft-caps its logits (Gemma 2, Cohere, Granite), which must run whole."""
    head = model.get_output_embeddings()
    scaled = any(getattr(model.config, key, None) not in (None, 1, 1.0)
                 for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return None if scaled else head


def group_by_prompt(pairs: Sequence[Pair], max_length: int | None = None,
                    min_group: int = 1) -> tuple[dict[tuple[int, ...], list[Row]], list[int]]:
    """The pairs that share a prompt, by prompt ids (groups of at least `min_group` rows), and
    the indices of the rest, which run alone: an empty prompt, a text over `max_length` tokens,
    or a smaller group."""
    groups: dict[tuple[int, ...], list[Row]] = {}
    alone = []
    for i, (prompt_ids, completion_ids) in enumerate(pairs):
        if prompt_ids and (max_length is None or len(prompt_ids) + len(completion_ids) <= max_length):
            groups.setdefault(tuple(prompt_ids), []).append((i, list(completion_ids)))
        else:
            alone.append(i)
    for key in [k for k, rows in groups.items() if len(rows) < min_group]:
        alone.extend(i for i, _ in groups.pop(key))
    return groups, sorted(alone)


@dataclass
class PromptPrefix:
    """The KV cache of `ids`, a token prefix that several prompts open with, run once."""

    ids: list[int]
    cache: DynamicCache

    def opens(self, prompt_ids: Sequence[int]) -> bool:
        """Does `prompt_ids` start with this prefix and go on past it?"""
        n = len(self.ids)
        return len(prompt_ids) > n and list(prompt_ids[:n]) == self.ids


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own."""
    if len(prompts) < 2:
        return 0
    first, k = prompts[0], min(len(p) for p in prompts) - 1
    for other in prompts[1:]:
        j = 0
        while j < k and first[j] == other[j]:
            j += 1
        k = j
    return max(k, 0)


def shareable_prefix_length(model, prompts: Sequence[Sequence[int]]) -> int:
    """common_prefix_length where a forward of its own pays (MIN_SHARED tokens or more) and the
    model's KV layers can be copied and extended as plain ones (no sliding window); else 0."""
    k = common_prefix_length(prompts)
    return k if k >= MIN_SHARED and plain_kv_layers(model) else 0


@torch.no_grad()
def shared_prefix(model, prompts: Sequence[Sequence[int]], tap=None) -> PromptPrefix | None:
    """The prefix all `prompts` share, run once; None where none is shareable. `tap`
    (pipeline.lm.trunk.Trunk or Replay): told before and after each forward of the pass, to
    replay or file what enters the first layer above the model's frozen trunk."""
    k = shareable_prefix_length(model, prompts)
    if not k:
        return None
    ids = list(prompts[0][:k])
    if tap is not None:
        tap.before("prefix", ids)
    out = model.base_model(input_ids=torch.tensor([ids], device=model.device), use_cache=True)
    if tap is not None:
        tap.prefix()
    return PromptPrefix(ids, returned_cache(out))


def grouped_states(model, groups: dict[tuple[int, ...], list[Row]], batch_size: int,
                   pad: int, lm_head=None, tap=None) -> Iterator[Scored]:
    """completion_states for every prompt group, the prefix the prompts share run once."""
    prefix = shared_prefix(model, list(groups), tap)
    for prompt_ids, rows in groups.items():
        yield from completion_states(model, list(prompt_ids), rows, batch_size, pad, prefix,
                                     lm_head, tap)


def picked_logprobs(lm_head, predictors: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(k,) float32: the log-prob of targets[k] under the distribution lm_head(predictors[k])
    gives, LOGIT_ROWS rows projected at a time."""
    out = [torch.zeros(0, device=predictors.device)]
    for start in range(0, len(targets), LOGIT_ROWS):
        logits = lm_head(predictors[start:start + LOGIT_ROWS]).float()
        picked = logits.gather(-1, targets[start:start + LOGIT_ROWS, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(logits, -1))
    return torch.cat(out)


@torch.no_grad()
def completion_states(model, prompt_ids: list[int], rows: Sequence[Row], batch_size: int,
                      pad: int, prefix: PromptPrefix | None = None,
                      lm_head=None, tap=None) -> Iterator[Scored]:
    """Per row sharing `prompt_ids`: (index, completion ids, states, log-probs), where states is
    (1 + len(ids), hidden): the final hidden state at the prompt's last token, then at each
    completion token; states[k] predicts completion token k. With `lm_head` (plain_lm_head),
    log-probs is (len(ids),) float32: each completion token's log-prob, every distinct token
    prefix projected to the vocabulary once (siblings share their parent's projections); else
    None. At most `batch_size` rows run in one forward: as token trees where the model allows
    it, else right-padded, shortest first. With a `prefix` the prompt opens with, only the
    prompt's tokens past it run."""
    base, start, cache = model.base_model, 0, {}
    if prefix is not None and prefix.opens(prompt_ids):
        start = len(prefix.ids)
        cache = with_cache(base, copy.deepcopy(prefix.cache))
    if tap is not None:
        tap.before("prompt", prompt_ids, start)
    first = base(input_ids=torch.tensor([prompt_ids[start:]], device=model.device),
                 position_ids=torch.arange(start, len(prompt_ids), device=model.device)[None],
                 use_cache=True, **cache)
    if tap is not None:
        tap.prompt(prompt_ids, start)
    prompt_state = first.last_hidden_state[0, -1:]
    run = _tree_states if tree_attention_fits(model) else _padded_states
    for i, ids, hidden, logps in run(model, returned_cache(first), prompt_state, len(prompt_ids),
                                     rows, batch_size, pad, lm_head, tap):
        states = torch.cat([prompt_state, hidden]) if ids else prompt_state
        if lm_head is not None and logps is None:  # one row's own tokens: nothing to share
            logps = picked_logprobs(lm_head, states[:-1], torch.tensor(ids, device=model.device))
        yield i, ids, states, logps


def _padded_states(model, prompt_cache, prompt_state, size: int, rows: Sequence[Row],
                   batch_size: int, pad: int, lm_head, tap=None):
    """(index, ids, states of the ids, None) per row, in right-padded batches of like length;
    each batch reads a copy of the prompt's cache, repeated per row (`prompt_state` and
    `lm_head` are unused: rows share no tokens, completion_states projects each)."""
    base, device = model.base_model, model.device
    for chunk in chunks(sorted(rows, key=lambda row: len(row[1])), batch_size):
        width = max(len(ids) for _, ids in chunk)
        hidden = None
        if width:
            cache = copy.deepcopy(prompt_cache)
            cache.batch_repeat_interleave(len(chunk))
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for _, ids in chunk], device=device)
            mask = torch.tensor([[1] * (size + len(ids)) + [0] * (width - len(ids)) for _, ids in chunk],
                                device=device)
            positions = torch.arange(size, size + width, device=device).expand(len(chunk), width)
            if tap is not None:
                told = [(ids, torch.arange(len(ids)), j) for j, (_, ids) in enumerate(chunk)]
                tap.before("rows", told, (len(chunk), width))
            hidden = base(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, **with_cache(base, cache)).last_hidden_state
        if tap is not None and width:
            tap.rows(told)
        for j, (i, ids) in enumerate(chunk):
            yield i, ids, hidden[j, :len(ids)] if ids else None, None


@dataclass
class TokenTree:
    """The completions of some rows as a trie of their token ids: each distinct prefix is one
    tree token. Tree token k is `tokens[k]` after its `parent[k]` (NO_PARENT: the prompt), at
    `depth[k]` tokens past the prompt; a parent comes before its children."""

    tokens: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    depth: list[int] = field(default_factory=list)
    rows: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # index, ids, path
    _child: dict[tuple[int, int], int] = field(default_factory=dict)

    def shared(self, ids: Sequence[int]) -> int:
        """How many leading tokens of `ids` the tree holds already."""
        node = NO_PARENT
        for k, token in enumerate(ids):
            node = self._child.get((node, token))
            if node is None:
                return k
        return len(ids)

    def add(self, i: int, ids: list[int]) -> None:
        node, path = NO_PARENT, []
        for token in ids:
            child = self._child.get((node, token))
            if child is None:
                child = self._child[node, token] = len(self.tokens)
                self.tokens.append(token)
                self.parent.append(node)
                self.depth.append(len(path))
            path.append(child)
            node = child
        self.rows.append((i, ids, path))

    def visible(self) -> torch.Tensor:
        """(tokens, tokens) bool: which tree tokens each one sees (its ancestors and itself)."""
        n = len(self.tokens)
        seen = torch.zeros(n, n, dtype=torch.bool)
        for k, parent in enumerate(self.parent):
            if parent != NO_PARENT:
                seen[k] = seen[parent]
            seen[k, k] = True
        return seen


def token_trees(rows: Sequence[Row], batch_size: int, budget: int) -> Iterator[TokenTree]:
    """The rows, in the order of their ids (rows that share a prefix side by side), cut into
    trees of at most `batch_size` rows and `budget` tree tokens (a longer row makes a tree of
    its own)."""
    tree = TokenTree()
    for i, ids in sorted(rows, key=lambda row: row[1]):
        new = len(ids) - tree.shared(ids)
        if tree.rows and (len(tree.rows) == batch_size or len(tree.tokens) + new > budget):
            yield tree
            tree = TokenTree()
        tree.add(i, list(ids))
    if tree.rows:
        yield tree


def _tree_states(model, prompt_cache, prompt_state, size: int, rows: Sequence[Row],
                 batch_size: int, pad: int, lm_head, tap=None):
    """(index, ids, states of the ids, their log-probs or None) per row, one forward per token
    tree after the prompt's cache (cut back to the prompt after each); with `lm_head`, each tree
    token's log-prob is read once, from its parent's state (`prompt_state` for the first
    tokens). `pad` is unused: a tree has no padding."""
    base, device = model.base_model, model.device
    blocked = torch.finfo(model.dtype).min
    for tree in token_trees(rows, batch_size, TREE_TOKENS):
        hidden = logps = None
        if tree.tokens:
            n = len(tree.tokens)
            mask = torch.full((n, size + n), blocked, dtype=model.dtype)
            mask[:, :size] = 0.0
            mask[:, size:].masked_fill_(tree.visible(), 0.0)
            positions = torch.tensor([[size + d for d in tree.depth]], device=device)
            if tap is not None:
                told = [(ids, torch.tensor(path, dtype=torch.long), 0) for _, ids, path in tree.rows]
                tap.before("rows", told, (1, n))
            hidden = base(input_ids=torch.tensor([tree.tokens], device=device),
                          attention_mask=mask[None, None].to(device), position_ids=positions,
                          use_cache=True, **with_cache(base, prompt_cache)).last_hidden_state[0]
            prompt_cache.crop(-n)  # back to the prompt alone (a negative count: tokens to drop)
            if tap is not None:
                tap.rows(told)
            if lm_head is not None:  # row 0 the prompt's state: a NO_PARENT (-1) token's predictor
                parents = torch.tensor(tree.parent, device=device) + 1
                logps = picked_logprobs(lm_head, torch.cat([prompt_state, hidden])[parents],
                                        torch.tensor(tree.tokens, device=device))
        for i, ids, path in tree.rows:
            at = torch.tensor(path, device=device, dtype=torch.long)
            yield (i, ids, hidden[at] if ids else None,
                   logps[at] if logps is not None else None)


def chunks(rows: list[Row], batch_size: int, waste: float = 1.5) -> Iterator[list[Row]]:
    """Rows sorted by length, cut into batches of at most `batch_size` whose right padding
    keeps the tokens run within `waste` times their real tokens (plus a few)."""
    chunk, real = [], 0
    for row in rows:
        width = len(row[1])  # the longest so far: rows come sorted
        if chunk and (len(chunk) == batch_size or (len(chunk) + 1) * width > waste * (real + width) + 8):
            yield chunk
            chunk, real = [], 0
        chunk.append(row)
        real += len(row[1])
    if chunk:
        yield chunk
