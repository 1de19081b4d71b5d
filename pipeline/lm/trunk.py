"""The frozen trunk of a LoRA phase: its decoder layers below the first adapted one.

With the adapter on the last layers only (`train.lora_layer_fraction`), the layers below the
first adapted one (and the embeddings) never change while DPO trains: the model the reference
pass runs (the adapter off) and the model at every training step compute the same states there.
The reference pass runs each pair's prompt once for both completions, and the prefix every
prompt opens with once (critics.shared_prompt); it records here, per token sequence, what enters
the first adapted layer (`Trunk.recording`, the pass's `tap`). Each training step then starts at
that layer (`replaying`): the layers below it pass their input through, and the recorded states
replace it, so a step's forward runs the adapted layers only. Nothing below the first adapted
layer needs a gradient, so the backward pass is the same. The states differ from the step's own
by floating-point rounding only (a token tree against a padded row); a batch with a sequence
the pass did not record runs whole. The pair metrics after training (the merged model, whose
layers below are still the same) replay it too, in their own token trees (`Replay`).

SHARE_TRUNK turns it off, for benchmarks that measure both ways.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

SHARE_TRUNK = True  # record the trunk in the reference pass and replay it in DPO's steps


def decoder_of(model):
    """The decoder (the module with `.layers`) of a causal LM, peft-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


def frozen_depth(model) -> int:
    """How many leading decoder layers, with the embeddings, have no trainable parameter (0 when
    the embeddings train, or the model has no `.layers`)."""
    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None)
    if layers is None or any(p.requires_grad for p in decoder.get_input_embeddings().parameters()):
        return 0
    depth = 0
    for layer in layers:
        if any(p.requires_grad for p in layer.parameters()):
            break
        depth += 1
    return depth if depth < len(layers) else 0


@dataclass
class Trunk:
    """Per token sequence (prompt ids + completion ids), and per prompt, the (length, hidden)
    states that enter decoder layer `depth`: what layers [0, depth) make of it. Recording, it is
    the shared-prompt pass's tap (critics.shared_prompt calls it after each forward)."""

    depth: int
    # per (prompt ids, completion ids): the states of the completion's tokens; one token
    # sequence may be split two ways (a step pair's prompt holds a trajectory pair's first step)
    states: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = field(default_factory=dict)
    sequences: dict[tuple[int, ...], tuple] = field(default_factory=dict)  # whole ids -> a key of states
    prompts: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # per prompt
    decoder: object = None  # the decoder it was recorded on
    versions: list[int] = field(default_factory=list)  # its trunk's weights' in-place versions
    _entering: torch.Tensor | None = None  # what entered layer `depth` in the last forward
    _prefix: torch.Tensor | None = None  # the shared prefix's states
    _prompt: tuple[tuple[int, ...], torch.Tensor] | None = None  # the current prompt's states

    @contextmanager
    def recording(self, model):
        """While open, every forward of `model` keeps what enters layer `depth`, for the
        shared-prompt pass given this trunk as its tap to file per sequence."""
        self.decoder = decoder_of(model)
        self.versions = [p._version for p in _trunk_weights(self.decoder, self.depth)]

        def keep(module, args):
            self._entering = args[0].detach()

        handle = self.decoder.layers[self.depth].register_forward_pre_hook(keep)
        try:
            yield self
        finally:
            handle.remove()
            self._entering = self._prefix = self._prompt = None

    def covers(self, pairs) -> bool:  # the tap's protocol: recording covers any pass
        return True

    def before(self, *what) -> None:  # the tap's protocol: nothing to prepare when recording
        pass

    def prefix(self) -> None:
        self._prefix = self._entering[0]

    def prompt(self, prompt_ids: list[int], start: int) -> None:
        """After a prompt's forward (its tokens past the shared prefix's `start`)."""
        own = self._entering[0]
        states = torch.cat([self._prefix[:start], own]) if start else own
        self._prompt = tuple(prompt_ids), states
        self.prompts[tuple(prompt_ids)] = states

    def rows(self, rows) -> None:
        """After a forward of the current prompt's completions; rows: (completion ids, the
        positions of its tokens in that forward's batch row, which row)."""
        prompt_ids, prompt = self._prompt
        for ids, at, row in rows:
            key = prompt_ids, tuple(ids)
            self.states[key] = self._entering[row][at]
            self.sequences[prompt_ids + key[1]] = key

    def batch(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        """(batch, width, hidden): the recorded states of right-padded rows (zeros at the
        padding), or None when a row was not recorded."""
        lengths = mask.sum(-1).tolist() if mask is not None else [input_ids.shape[1]] * len(input_ids)
        found = []
        for row, n in zip(input_ids.tolist(), lengths):
            key = self.sequences.get(tuple(row[:n]))
            if key is None or (mask is not None and n and not bool(mask[len(found), :n].all())):
                return None
            found.append(torch.cat([self.prompts[key[0]], self.states[key]]))
        out = found[0].new_zeros(len(found), input_ids.shape[1], found[0].shape[-1])
        for b, states in enumerate(found):
            out[b, :len(states)] = states
        return out


@dataclass
class Replay:
    """The shared-prompt pass's tap that feeds a recorded trunk to another model with the same
    layers below `trunk.depth` (critics.shared_prompt calls `before` ahead of each forward):
    each forward starts at that layer. A pass it does not wholly cover runs whole (`covers`):
    its forwards share KV caches, and a replayed forward leaves zeros in the skipped layers'."""

    trunk: Trunk
    ready: torch.Tensor | None = None  # what the next forward's layer `depth` takes
    _prompt: tuple[int, ...] = ()

    def covers(self, pairs) -> bool:
        return all(tuple(p) in self.trunk.prompts and (tuple(p), tuple(c)) in self.trunk.states
                   for p, c in pairs)

    def before(self, kind: str, *what) -> None:
        """kind "prefix" (ids), "prompt" (prompt ids, start) or "rows" (rows as `Trunk.rows`
        takes them, the forward's (batch, width))."""
        prompts = self.trunk.prompts
        if kind == "prefix":
            (ids,) = what
            opening = next(s for p, s in prompts.items() if p[:len(ids)] == tuple(ids))
            self.ready = opening[None, :len(ids)]
        elif kind == "prompt":
            prompt_ids, start = what
            self._prompt = tuple(prompt_ids)
            self.ready = prompts[self._prompt][None, start:]
        else:
            rows, (batch, width) = what
            some = next(iter(prompts.values()))
            self.ready = some.new_zeros(batch, width, some.shape[-1])
            for ids, at, row in rows:
                if ids:
                    self.ready[row, at] = self.trunk.states[self._prompt, tuple(ids)]

    def prefix(self) -> None:  # the recording half of the tap's protocol: nothing to file
        pass

    def prompt(self, prompt_ids, start) -> None:
        pass

    def rows(self, rows) -> None:
        pass


def _passing(layer, ready):
    """`layer`'s forward, passing its input through while `ready()` holds states, and writing
    zeros into its KV cache slots then (nothing reads them: the layer never runs in that pass)."""
    whole = layer.forward
    attention = layer.self_attn

    def forward(hidden_states, *args, **kwargs):
        if ready() is None:
            return whole(hidden_states, *args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            heads = attention.config.num_key_value_heads
            zeros = hidden_states.new_zeros(*hidden_states.shape[:2], heads, attention.head_dim)
            cache.update(zeros.transpose(1, 2), zeros.transpose(1, 2), attention.layer_idx)
        return hidden_states
    return forward


@contextmanager
def _starting_at(decoder, depth: int, ready, take):
    """While open, a forward of `decoder` for which `ready()` holds states skips the layers
    below `depth`, and layer `depth` takes those states instead of its input (`take()` hands
    them over and clears them)."""
    def enter(module, args, kwargs):
        if ready() is None:
            return None
        states = take()
        return (states.to(args[0].dtype), *args[1:]), kwargs

    below = list(decoder.layers[:depth])
    handle = decoder.layers[depth].register_forward_pre_hook(enter, with_kwargs=True)
    for layer in below:
        layer.forward = _passing(layer, ready)
    try:
        yield
    finally:
        handle.remove()
        for layer in below:
            del layer.forward


def _trunk_weights(decoder, depth: int) -> list[torch.Tensor]:
    """The weights below layer `depth`: the input embeddings' and the layers'."""
    return [*decoder.get_input_embeddings().parameters(),
            *(p for layer in decoder.layers[:depth] for p in layer.parameters())]


def _same_trunk(model, trunk: Trunk | None) -> bool:
    """Does `model` compute the trunk's states: the decoder it was recorded on, its trunk's
    weights not changed in place since, or another decoder with equal trunk weights?"""
    if trunk is None or not trunk.states:
        return False
    decoder = decoder_of(model)
    if decoder is trunk.decoder:
        return [p._version for p in _trunk_weights(decoder, trunk.depth)] == trunk.versions
    if type(decoder) is not type(trunk.decoder) or len(decoder.layers) <= trunk.depth:
        return False
    ours, theirs = _trunk_weights(decoder, trunk.depth), _trunk_weights(trunk.decoder, trunk.depth)
    return len(ours) == len(theirs) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(ours, theirs))


@contextmanager
def replaying(model, trunk: Trunk | None):
    """While open, a forward of `model` on right-padded rows the trunk recorded starts at layer
    `trunk.depth` with the recorded states; any other forward runs whole. A no-op without a
    trunk, for another model, or when a layer below its depth trains."""
    if not _same_trunk(model, trunk) or frozen_depth(model) < trunk.depth:
        yield
        return
    decoder = decoder_of(model)
    ready: list[torch.Tensor | None] = [None]

    def arrive(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        ready[0] = None if ids is None else trunk.batch(ids, kwargs.get("attention_mask"))

    def take():
        states, ready[0] = ready[0], None
        return states

    handle = decoder.register_forward_pre_hook(arrive, with_kwargs=True)
    try:
        with _starting_at(decoder, trunk.depth, lambda: ready[0], take):
            yield
    finally:
        handle.remove()


@contextmanager
def replaying_passes(model, trunk: Trunk | None):
    """A tap (`Replay`) for the shared-prompt passes of `model` (critics.shared_prompt,
    pipeline.lm.teacher_forced.tail_logprobs) that starts their forwards at the trunk's depth;
    None without a trunk whose states `model` computes (`_same_trunk`)."""
    if not _same_trunk(model, trunk):
        yield None
        return
    tap = Replay(trunk)

    def take():
        states, tap.ready = tap.ready, None
        return states

    with _starting_at(decoder_of(model), trunk.depth, lambda: tap.ready, take):
        yield tap
