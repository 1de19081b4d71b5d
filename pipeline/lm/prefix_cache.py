"""Prefix sharing for batched generation: one prefill per distinct prompt, KV reuse across calls.

Tree search asks for c options of a node at once (c rows with the same prompt + path) and,
a round later, for the options of that node's children, whose prompts extend the node's.
Two things follow:

1. `prefill` runs the model once per *distinct* token sequence of a batch and copies the KV
   cache to every row that shares it (`batch_select_indices` with repeated indices).
2. A `PrefixCache` keeps the KV of finished rows in a radix tree over token ids (SGLang's
   RadixAttention, in miniature), bounded in bytes and evicted least-recently-used, so a later
   prompt prefills only the tokens past its longest cached prefix.

Keys are token ids, never text. A prompt is tokenized whole (as without the cache), and the
cache serves its longest token prefix that some earlier row ran through the model. Because
BPE merges across the seam, tokenize(prefix + option) can differ from the generated ids of
the option (the option cut at "\\n" from a "\\n\\n" token; a space merged into the next
word): the match then stops at the first differing token and the rest is prefilled. A cached
token's KV depends only on the tokens before it, so any match is exact. At least one token is
always prefilled: its logits start the decoding.

Each stored token costs layers x 2 x kv_heads x head_dim x dtype bytes (SmolLM2-135M in
float32: 46 KB). Only plain (non-sliding) DynamicCache layers are cached; other models run
with prefill sharing inside a batch but no reuse across calls.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from critics.shared_prompt import (
    plain_kv_layers,
    returned_cache,
    shareable_prefix_length,
    with_cache,
)


@dataclass
class CacheStats:
    """What prefill cost and what the cache saved (token counts, all calls together)."""

    row_prompt_tokens: int = 0  # prompt tokens of every row: what a prefill per row would run
    prompt_tokens: int = 0  # prompt tokens of the distinct prompts (one prefill per node)
    reused_tokens: int = 0  # of those, served from the cache
    shared_tokens: int = 0  # of the rest, served by a prefix common to a call's prompts, run once
    prefill_tokens: int = 0  # tokens run through the model (each shared prefix counted once)
    lookups: int = 0  # distinct prompts looked up
    hits: int = 0  # lookups that reused at least one token
    stored_tokens: int = 0  # tokens written into the cache
    evicted_tokens: int = 0
    bytes: int = 0  # KV bytes held now
    peak_bytes: int = 0  # most KV bytes held at once

    @property
    def hit_rate(self) -> float:
        """Share of the distinct prompts' tokens whose KV came from the cache."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return dict(d, hit_rate=round(self.hit_rate, 4), peak_mb=round(self.peak_bytes / 2**20, 1))


class _Node:
    """A radix-tree edge: a run of tokens and their KV, (layers, 2, kv_heads, len, head_dim)."""

    __slots__ = ("tokens", "kv", "children", "parent")

    def __init__(self, tokens: tuple, kv: torch.Tensor | None, parent: _Node | None):
        self.tokens, self.kv, self.parent = tokens, kv, parent
        self.children: dict[int, _Node] = {}


class PrefixCache:
    """KV of token prefixes, at most `max_mb` MiB, least-recently-used evicted first.

    Every node is older in the LRU order than its ancestors (a path is touched leaf first),
    so the oldest node is always a leaf and eviction never orphans a cached suffix.
    """

    def __init__(self, max_mb: float):
        self.capacity = int(max_mb * 2**20)
        self.root = _Node((), None, None)
        self.lru: OrderedDict[_Node, None] = OrderedDict()
        self.stats = CacheStats()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def usable(self, model) -> bool:
        return self.enabled and self.supports(model)

    def supports(self, model) -> bool:
        """Only plain full-attention KV layers can be sliced by position and reused."""
        return plain_kv_layers(model)

    def match(self, tokens: Sequence[int]) -> tuple[int, list[tuple[_Node, int]]]:
        """Length of the longest cached prefix of `tokens`, and the (node, tokens used) path."""
        node, i, path = self.root, 0, []
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _common_prefix(child.tokens, tokens, i)
            path.append((child, k))
            i += k
            if k < len(child.tokens):
                break
            node = child
        return i, path

    def lookup(self, tokens: Sequence[int]) -> tuple[int, torch.Tensor | None]:
        """The cached KV of `tokens`' longest prefix, leaving at least its last token to run."""
        m, path = self.match(tokens) if self.enabled else (0, [])
        m = min(m, len(tokens) - 1)
        if m <= 0:
            return 0, None
        self._touch([node for node, _ in path])
        kv = torch.cat([node.kv[..., :k, :] for node, k in path], dim=-2)
        return m, kv[..., :m, :]

    def insert(self, tokens: Sequence[int], kv_from: Callable[[int], torch.Tensor]) -> None:
        """Cache `tokens`; `kv_from(start)` gives the KV of tokens[start:] (only new ones are asked).
        Room is made first (least recent leaves out), so the cache never holds more than its
        bound; a suffix with no room beside the prefix it extends is not cached."""
        if not self.enabled or not tokens:
            return
        m, path = self.match(tokens)
        self._touch([node for node, _ in path])
        if m == len(tokens):
            return
        kv = kv_from(m).contiguous()
        size, keep = kv.numel() * kv.element_size(), {node for node, _ in path}
        if size + sum(_bytes(node) for node in keep) > self.capacity:
            return  # no room even with everything else evicted: evict nothing
        if not self._make_room(size, keep):
            return
        parent = self.root
        if path:
            last, k = path[-1]
            parent = self._split(last, k) if k < len(last.tokens) else last
        node = _Node(tuple(tokens[m:]), kv, parent)
        parent.children[node.tokens[0]] = node
        self.lru[node] = None
        self._account(node, +1)
        self.stats.stored_tokens += len(node.tokens)
        chain, up = [node], parent
        while up is not self.root:
            chain.append(up)
            up = up.parent
        self._touch(chain[::-1])

    def _split(self, node: _Node, k: int) -> _Node:
        """Cut `node` after its first k tokens; returns the new upper half."""
        upper = _Node(node.tokens[:k], node.kv[..., :k, :].clone(), node.parent)
        node.parent.children[upper.tokens[0]] = upper
        node.tokens, node.kv, node.parent = node.tokens[k:], node.kv[..., k:, :].clone(), upper
        upper.children[node.tokens[0]] = node
        self.lru[upper] = None
        return upper

    def _touch(self, path: list[_Node]) -> None:
        for node in reversed(path):  # leaf first: ancestors end up more recent
            self.lru.move_to_end(node)

    def _account(self, node: _Node, sign: int) -> None:
        s = self.stats
        s.bytes += sign * _bytes(node)
        s.peak_bytes = max(s.peak_bytes, s.bytes)

    def _make_room(self, size: int, keep: set[_Node]) -> bool:
        """Evict least recent leaves until `size` more bytes fit; False (nothing more evicted)
        when only `keep` (the prefix being extended) would be left to evict."""
        while self.stats.bytes + size > self.capacity:
            if not self.lru:
                return False
            node = next(iter(self.lru))
            if node in keep:
                return False
            del self.lru[node]
            if node.children:  # cannot happen while the order invariant holds; keep it safe
                self.lru[node] = None
                continue
            del node.parent.children[node.tokens[0]]
            self._account(node, -1)
            self.stats.evicted_tokens += len(node.tokens)
        return True


def _bytes(node: _Node) -> int:
    return node.kv.numel() * node.kv.element_size()


def _common_prefix(segment: tuple, tokens: Sequence[int], start: int) -> int:
    n = min(len(segment), len(tokens) - start)
    k = 0
    while k < n and segment[k] == tokens[start + k]:
        k += 1
    return k


@dataclass
class Prefilled:
    cache: DynamicCache  # one row per prompt
    mask: torch.Tensor  # (rows, cached + new): 1 on real tokens (padding may sit in the middle)
    logits: torch.Tensor  # (rows, vocab), float32: the next-token logits
    prompt_ids: list[list[int]]  # each row's prompt tokens
    hidden: torch.Tensor | None = None  # (rows, hidden_size) at the prompt's last token, if asked


def forward_last(model, want_hidden: bool, cache,
                 **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The next-token logits (float32) at each row's last position and, if asked, the final
    hidden state there (the decoder's output after its final norm, what the critics' heads read).
    With the hidden state the decoder and the output embedding run apart, which is what a causal
    LM's forward does (models that scale or cap their logits need critics.leaf_features=backbone)."""
    if not want_hidden:
        return model(**inputs, use_cache=True, logits_to_keep=1,
                     **with_cache(model, cache)).logits[:, -1, :].float(), None
    base = model.base_model
    last = base(**inputs, use_cache=True, **with_cache(base, cache)).last_hidden_state[:, -1, :]
    return model.get_output_embeddings()(last).float(), last.float()


def prefill(model, tokenizer, prompts: Sequence[str], store: PrefixCache | None,
            hidden: bool = False) -> Prefilled:
    """One forward pass over the distinct prompts' uncached tokens; rows share their prompt's KV.

    Layout per distinct prompt u with m_u cached tokens and s_u to run: the cached part is
    left-padded to the longest cached part, the new part left-padded to the longest new part;
    positions count real tokens only, so a token's position never depends on its batch.
    """
    ids = tokenizer(list(prompts), add_special_tokens=False).input_ids
    index: dict[tuple, int] = {}
    rows = [index.setdefault(tuple(x), len(index)) for x in ids]
    seqs = list(index)
    use = store if store is not None and store.usable(model) else None
    cached = [use.lookup(s) if use else (0, None) for s in seqs]
    found, ran = _share_prefix(model, seqs, cached, use)
    past_len = max(m for m, _ in found)
    new_len = max(len(s) - m for s, (m, _) in zip(seqs, found))
    pad, device = tokenizer.pad_token_id, model.device
    input_ids = torch.tensor([[pad] * (new_len - len(s) + m) + list(s[m:])
                              for s, (m, _) in zip(seqs, found)], device=device)
    new_mask = torch.tensor([[0] * (new_len - len(s) + m) + [1] * (len(s) - m)
                             for s, (m, _) in zip(seqs, found)], device=device)
    past_mask = torch.tensor([[0] * (past_len - m) + [1] * m for m, _ in found], device=device,
                             dtype=new_mask.dtype)
    offsets = torch.tensor([[m] for m, _ in found], device=device)
    positions = offsets + (new_mask.cumsum(-1) - 1).clamp(min=0)
    cache = _cache_with_past(model, found, past_len)
    mask = torch.cat([past_mask, new_mask], dim=1)
    logits, last = forward_last(model, hidden, cache, input_ids=input_ids, attention_mask=mask,
                                position_ids=positions)
    if len(seqs) < len(rows):
        select = torch.tensor(rows, device=device)
        cache.batch_select_indices(select)
        mask, logits = mask[select], logits[select]
        last = last[select] if last is not None else None
    _count(store, ids, seqs, cached, found, ran)
    return Prefilled(cache, mask, logits, [list(x) for x in ids], last)


def _cache_with_past(model, found: list, past_len: int) -> DynamicCache:
    if past_len == 0:
        return DynamicCache(config=model.config)
    like = next(kv for m, kv in found if m)
    layers, _, heads, _, dim = like.shape
    past = like.new_zeros((layers, 2, len(found), heads, past_len, dim))
    for u, (m, kv) in enumerate(found):
        if m:
            past[:, :, u, :, past_len - m:] = kv
    return DynamicCache([(past[i, 0], past[i, 1]) for i in range(layers)], config=model.config)


def _share_prefix(model, seqs: list, found: list,
                  store: PrefixCache | None) -> tuple[list, int]:
    """`found`, where the distinct prompts share a longer token prefix than the cache served
    them (a task's system prompt and worked example): that prefix runs once, for all of them,
    and goes into the store. Also the number of tokens that run took (0: none ran)."""
    k = shareable_prefix_length(model, seqs)
    if not k or all(m >= k for m, _ in found):
        return found, 0
    m, kv = max(((min(m, k), kv) for m, kv in found), key=lambda x: x[0])
    shared = kv[..., :k, :] if m == k else _run_prefix(model, list(seqs[0][:k]), m, kv)
    if store is not None:
        store.insert(seqs[0][:k], lambda start: shared[..., start:, :])
    return [(k, shared) if mu < k else (mu, kvu) for mu, kvu in found], k - m


def _run_prefix(model, tokens: list[int], m: int, kv: torch.Tensor | None) -> torch.Tensor:
    """The KV, (layers, 2, kv_heads, tokens, head_dim), of `tokens`, whose first m are `kv`."""
    base, device = model.base_model, model.device
    out = base(input_ids=torch.tensor([tokens[m:]], device=device),
               position_ids=torch.arange(m, len(tokens), device=device)[None], use_cache=True,
               **with_cache(base, _cache_with_past(model, [(m, kv)], m)))
    return torch.stack([torch.stack([x.keys[0], x.values[0]]) for x in returned_cache(out).layers])


def _count(store: PrefixCache | None, ids: list, seqs: list, cached: list, found: list,
           shared_run: int) -> None:
    if store is None:
        return
    s = store.stats
    s.row_prompt_tokens += sum(len(x) for x in ids)
    s.lookups += len(seqs)
    s.hits += sum(m > 0 for m, _ in cached)
    s.prompt_tokens += sum(len(x) for x in seqs)
    s.reused_tokens += sum(m for m, _ in cached)
    s.shared_tokens += sum(m - c for (m, _), (c, _) in zip(found, cached))
    s.prefill_tokens += shared_run + sum(len(x) - m for x, (m, _) in zip(seqs, found))


def retire(store: PrefixCache | None, cache: DynamicCache, j: int, mask_row: torch.Tensor,
           prompt_ids: list[int], new_tokens: list[int]) -> None:
    """Cache the KV of batch row j (its prompt and the generated tokens it ran) before it leaves.
    `store` must be usable for the model (`PrefixCache.usable`)."""
    positions = mask_row.nonzero().flatten()  # where the row's real tokens sit in the cache
    ran = len(positions) - len(prompt_ids)
    tokens = prompt_ids + new_tokens[:ran]

    def kv_from(start: int) -> torch.Tensor:
        at = positions[start:]
        return torch.stack([torch.stack([x.keys[j][:, at], x.values[j][:, at]])
                            for x in cache.layers])

    store.insert(tokens, kv_from)
