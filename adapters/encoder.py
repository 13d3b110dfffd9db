"""The shared encoder patch for Hugging Face ViT-style encoder layers (ViViT, VideoMAE, AST, CLIP, SigLIP).

Where a token is chosen, merged and restored, in one walk:

    model's own layer loop:  hidden = layer(hidden, ...)            (untouched upstream code)
    a patched layer (its class swapped, tomesd-style) receives either the embeddings (its first layer)
    or a ``MergingCarry(hidden, state)`` from the layer before, and runs
        x = x + attention(norm1(x))      the layer's own attention module, seen through a per-call
                                         ``_AttentionCall`` that adds log(size) to the logits and hands
                                         back the head-averaged keys (the metric)
        plan = matcher(metric, state, r)                   (choose: mmmerge.matchers)
        x, state = merge_tokens(x, state, plan)            (merge: mmmerge.merge)
        x = feed_forward(x)              the layer's own MLP
    and hands the next layer ``MergingCarry(x, state)``; the last one hands back a plain tensor (the
    merged tokens, or ``unmerge``'d to one row per original token for heads that average over tokens).

The layer's parts and the attention view live in ``anatomy.py``, the token grid and the time modes' layouts in
``layout.py``. The token state is a value that travels with one call: nothing is stored on a module during a forward,
no hook is registered per call, so a patched model can be deep-copied, pickled, called from several
threads and compiled with ``torch.compile(fullgraph=True)``; shapes depend only on the schedule.
Everything a patch needs (schedule, per-layer partitions, static index tensors) is fixed at patch time
and lives on the layers themselves (plain attributes and non-persistent buffers), so it moves with
``.to(device)`` and copies with the model; ``unpatch`` swaps the classes back and removes it all.
"""
from __future__ import annotations

import functools
import threading
import types
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from mmmerge.attention import size_bias
from mmmerge.constraints import Constraint, Global, GroupTables, Partition
from mmmerge.fused import fused_choice, fused_step, fused_tables
from mmmerge.info import MergeInfo
from mmmerge.matchers import a_first
from mmmerge.methods import check_options, get_matcher, group_tables
from mmmerge.merge import merge_tokens, unmerge
from mmmerge.patching import register_info, register_unpatch
from mmmerge.schedule import (LayerFlops, ScheduleSpec, layer_partitions, resolve_schedule,
                              tokens_per_layer, transformer_layer_flops)
from mmmerge.state import TokenState

# The layer's anatomy and the token layout have files of their own; the adapters import them from here too.
from .anatomy import (BIAS_BACKENDS, LayerParts, _attend, _AttentionCall, _attention_config,  # noqa: F401
                      _base_attention, _feed_forward, encoder_layers, layer_parts)
from .layout import MergeLayout, TokenGrid, plan_layout  # noqa: F401

# --------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class PatchSpec:
    """What one patch does; shared (by reference) by the patched layers of one model.

    ``tokens``: tokens the embeddings produce; ``entry_tokens``: tokens after the entry index (dropped
    padding), which layer ``first`` starts merging from. ``position_coords``: static ``[entry_tokens]``
    coordinates of every position (time, row, ...) with their merge rules, for reporting what merged.
    """

    method: str
    options: Mapping[str, Any]
    constraint: Constraint
    schedule: Tuple[int, ...]
    protected: int
    tokens: int
    entry_tokens: int
    prop_attn: bool
    trace_source: bool
    output: str  # "merged" or "original" (unmerge at the end, for heads that average over tokens)
    first: int  # first patched layer (it builds the state)
    last: int = -1  # last patched layer (it hands back a plain tensor)
    carried: Tuple[str, ...] = ()  # coordinates the constraint reads, carried in the state
    rules: Mapping[str, str] = field(default_factory=dict)
    position_coords: Mapping[str, Tensor] = field(default_factory=dict)
    entry: bool = False  # an entry index (buffer) selects / reorders the embeddings
    family: str = "encoder"  # what patched it (video, audio, llava), for messages
    grid: Optional["TokenGrid"] = None  # the token layout entering the first layer (model's token order)
    extra: Mapping[str, Any] = field(default_factory=dict)  # the adapter's own record (e.g. its options)

    @property
    def num_layers(self) -> int:
        return len(self.schedule)

    @property
    def needs_source(self) -> bool:
        return self.trace_source or self.output == "original"


@dataclass(frozen=True)
class LayerSpec:
    """The static plan of one patched layer, decided at patch time: everything its forward needs but the
    tokens and their state. Travels with the layer (``.to()``, copy, pickle: module references are the
    layer's own children, and the partition reads its tensors from the layer's buffers on each call)."""

    patch: PatchSpec
    index: int
    r: int
    partition: Optional[Partition]  # sizes, budgets (tensors in the layer's buffers)
    bias: bool  # tokens entering this layer may be merged: add log(size) to its attention
    attn_config: Any = None  # the attention config copy naming the "mmmerge" function (None: upstream forward)
    base_attention: Optional[Callable] = None
    parts: Optional[LayerParts] = None  # the layer's own norms and attention module
    choose: Optional[Callable[..., Any]] = None  # (metric, state, r[, noise]) -> MergePlan, options bound
    fused: Optional[Callable[..., Any]] = None  # the fused plan op (``mmmerge.fused.fused_choice``), or None


class MergingCarry(NamedTuple):
    """What a patched layer hands the next one: its output tokens and their state.

    A tuple, so transformers' output recorders (``output_hidden_states``) record the hidden states."""

    hidden: Tensor
    state: TokenState


# ------------------------------------------------------------------------------------ the merging layer
_MERGING_CLASSES: Dict[type, type] = {}
_lock = threading.Lock()


class MergingLayer:
    """Mixin of the swapped layer classes. ``type(layer)._mmmerge_base`` is the original class."""

    _mmmerge_base: type

    def __reduce_ex__(self, protocol: int):
        # Rebuilt from the original class, so pickle / torch.save / copy.deepcopy give a patched copy.
        return (_rebuild_merging_layer, (type(self)._mmmerge_base,), self.__dict__)


def merging_class(base: type) -> type:
    """The swapped class for layers of class ``base`` (one per class, made once)."""
    with _lock:
        cls = _MERGING_CLASSES.get(base)
        if cls is None:
            cls = type(f"Merging{base.__name__}", (MergingLayer, base), {"_mmmerge_base": base})
            cls.__module__ = __name__
            # Set after creation: GradientCheckpointingLayer wraps forward/__call__ of subclasses; this
            # layer checkpoints itself (its body is a pure function of the tokens and their state).
            cls.forward = _merging_forward
            cls.__call__ = nn.Module.__call__
            _MERGING_CLASSES[base] = cls
    return cls


def _rebuild_merging_layer(base: type) -> nn.Module:
    cls = merging_class(base)
    return cls.__new__(cls)


def _buffer(layer: nn.Module, name: str) -> Optional[Tensor]:
    return layer._buffers.get(f"_mmmerge_{name}")


class _LayerBuffers:
    """The source of a partition's ``GroupTables``: the layer's buffers, read on each call (so they follow
    ``.to()``)."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def get(self, name: str, default: Any = None) -> Any:
        return self.layer._buffers.get(f"_mmmerge_{name}", default)


def _initial_state(layer: nn.Module, patch: PatchSpec, x: Tensor) -> TokenState:
    """State of the unmerged tokens ``x`` ``[B, N, C]``: size 1 each; source, carried spans, padding."""
    B, N = x.shape[:2]
    size = torch.ones(B, N, device=x.device, dtype=torch.float32)
    source = torch.arange(N, device=x.device).expand(B, N) if patch.needs_source else None
    coords: Dict[str, Tensor] = {}
    if patch.carried:
        times = _buffer(layer, "time")  # [len(axes), N] long, one row per carried axis
        for row, axis in enumerate(dict.fromkeys(name[:-4] for name in patch.carried)):
            t = times[row].to(torch.float32).expand(B, N)
            coords[f"{axis}_min"], coords[f"{axis}_max"] = t, t
    valid = _buffer(layer, "valid")
    if valid is not None:
        if valid.shape[0] not in (1, B):
            raise ValueError(f"the patch holds padding for {valid.shape[0]} clips but the batch has {B}; re-patch "
                             "with one length per clip (or set_lengths)")
        valid = valid.expand(B, N)
    return TokenState(size=size, source=source, coords=coords, rules=dict(patch.rules), protected=patch.protected,
                      valid=valid)


def _enter(layer: nn.Module, spec: LayerSpec, hidden: Tensor) -> MergingCarry:
    patch = spec.patch
    if isinstance(hidden, MergingCarry):
        raise RuntimeError(f"mmmerge: layer {spec.index} starts this patch but received a merged state; the "
                           "encoder's layers ran out of order")
    if not isinstance(hidden, Tensor) or hidden.dim() != 3:
        raise ValueError(f"mmmerge: encoder layer {spec.index} expects hidden states [B, N, C], got "
                         f"{getattr(hidden, 'shape', type(hidden).__name__)}")
    if hidden.shape[1] != (patch.tokens if spec.index == 0 else patch.entry_tokens):
        raise ValueError(
            f"the encoder got {hidden.shape[1]} tokens but this patch was set up for "
            f"{patch.tokens if spec.index == 0 else patch.entry_tokens}; re-patch the model after changing the "
            "input size (frames, resolution, audio length) or masking"
        )
    if patch.entry and spec.index == 0:
        hidden = hidden.index_select(1, _buffer(layer, "entry"))
    return MergingCarry(hidden, _initial_state(layer, patch, hidden))


def _exit(layer: nn.Module, spec: LayerSpec, x: Tensor, state: TokenState) -> Tensor:
    patch = spec.patch
    if patch.trace_source:
        _record(layer, state)
    if patch.output == "original":
        x = unmerge(x, state)
        order = _buffer(layer, "exit")
        if order is not None:  # back from the entry order to the model's own token order
            x = x.index_select(1, order)
    return x


def _layer_body(layer: nn.Module, spec: LayerSpec, state: TokenState, noise: Optional[Tensor],
                x: Tensor) -> Tuple[Tensor, TokenState]:
    """One merging layer: attention (+ log(size)), choose, merge, MLP. A pure function of ``(x, state)``
    (and the pre-drawn ``noise`` of the random baseline), so a checkpointing recompute makes the same plan."""
    parts = spec.parts
    bias = size_bias(state.size) if spec.bias else None
    call = _AttentionCall(parts.attention, spec.attn_config, spec.base_attention, bias, metric=spec.r > 0)
    attn, metric = _attend(layer, parts, parts.norm1(x), call)
    x = x + attn
    if spec.fused is not None:  # choose and merge as two fused ops
        buffers = layer._buffers
        x, state = fused_step(x, state, metric, spec.fused, buffers["_mmmerge_fused_ids"],
                              buffers["_mmmerge_fused_sel"])
    elif spec.r > 0:
        plan = spec.choose(metric, state, spec.r) if noise is None else spec.choose(metric, state, spec.r,
                                                                                   noise=noise)
        x, state = merge_tokens(x, state, plan)
    return _feed_forward(layer, parts, x), state


def _merging_forward(self: nn.Module, hidden_states: Any, *args: Any, **kwargs: Any) -> Any:
    """``forward`` of a patched layer: unpack the carry, run the layer, hand on the carry (or the output)."""
    spec: LayerSpec = self._mmmerge
    patch = spec.patch
    carry = hidden_states if spec.index != patch.first else _enter(self, spec, hidden_states)
    if not isinstance(carry, MergingCarry):
        raise RuntimeError(f"mmmerge: patched encoder layer {spec.index} received plain hidden states; the "
                           f"encoder's layers ran out of order (layer {patch.first} starts the patch)")
    mask = args[0] if args else kwargs.get("attention_mask")
    if mask is not None and not torch.compiler.is_compiling():
        # A padding mask is [B, 1, N0, N0]: it has no meaning for merged tokens, and merging would mix
        # padding into real tokens. Unmerged (r=0) nothing is patched and the mask works as usual. (While
        # compiling, older transformers (5.17) build an all-ones mask even without one, which cannot be told
        # apart from a user's without reading it: it is left out. Eager calls refuse a mask here.)
        raise ValueError("mmmerge cannot merge tokens under an attention mask; pass attention_mask=None "
                         "(or patch with r=0 to run the model unmerged with its mask)")
    x, state = carry
    noise = None
    if patch.method == "random" and spec.r > 0 and "noise" not in patch.options:
        generator = patch.options.get("generator")
        if generator is not None and torch.compiler.is_compiling():
            raise RuntimeError("mmmerge: method 'random' with a torch.Generator cannot be compiled (torch.compile "
                               "does not trace user generators); compile it without generator= (torch's own "
                               "random stream) or run it eagerly")
        # Drawn outside the checkpointed body: the recompute reuses these draws, so it makes the same plan.
        noise = torch.rand(x.shape[:2], device=x.device, generator=generator)
    if spec.attn_config is None:  # nothing merges here and no bias is due: the layer's own forward
        def body(h: Tensor) -> Tuple[Tensor, TokenState]:
            return type(self)._mmmerge_base.forward(self, h, *args, **kwargs), state
    else:
        body = functools.partial(_layer_body, self, spec, state, noise)
    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
        x, state = self._gradient_checkpointing_func(body, x)
    else:
        x, state = body(x)
    if spec.index == patch.last:
        return _exit(self, spec, x, state)
    return MergingCarry(x, state)


# ------------------------------------------------------------------------------------ what a call did
_TRACE = threading.local()  # per thread: (weakref to the last patched layer, its patch, final TokenState)


def _record(layer: nn.Module, state: TokenState) -> None:
    """Keep the final state of this call for ``last_info`` (this thread only; eager only)."""
    if not torch.compiler.is_compiling():
        _TRACE.last = (weakref.ref(layer), layer._mmmerge.patch, state)


def _patched_layers(model: nn.Module) -> List[nn.Module]:
    patch = model.__dict__.get("_mmmerge_patch")
    return [m for m in model.modules() if isinstance(m, MergingLayer) and m._mmmerge.patch is patch]


def merge_info(model: nn.Module) -> MergeInfo:
    """What a forward of ``model`` does: schedule and tokens per layer (the same for every input of the
    patched shape), and with ``trace_source=True`` the final state of this thread's last eager forward
    (sizes, source map in the model's token order, coordinates of the merged tokens)."""
    patch: Optional[PatchSpec] = model.__dict__.get("_mmmerge_patch")
    if patch is None:
        raise ValueError(f"{type(model).__name__} is not patched by mmmerge; call mmmerge.patch(model, ...) first")
    info = MergeInfo(schedule=list(patch.schedule), tokens_per_layer=tokens_per_layer(patch.schedule, patch.entry_tokens))
    layers = _patched_layers(model)
    last = getattr(_TRACE, "last", None)
    if layers and last is not None and last[0]() is layers[-1] and last[1] is patch:
        info.state = _report_state(layers[-1], patch, last[2])
    return info


def _report_state(layer: nn.Module, patch: PatchSpec, state: TokenState) -> TokenState:
    """The final state as users read it: source in the model's token order, every position coordinate
    combined over each merged token (mean for centroids, min/max for span ends)."""
    source = state.source
    order = _buffer(layer, "exit")
    if order is not None:
        source = source.index_select(1, order)
    B, N = state.size.shape
    coords: Dict[str, Tensor] = {}
    for name, values in patch.position_coords.items():
        v = values.to(source.device).expand(B, -1)
        rule = patch.rules.get(name, "mean")
        if rule == "mean":
            coords[name] = torch.zeros(B, N, device=source.device).scatter_add_(1, source, v) / state.size
        else:
            reduce = "amin" if rule == "min" else "amax"
            coords[name] = torch.zeros(B, N, device=source.device).scatter_reduce_(1, source, v, reduce,
                                                                                   include_self=False)
    valid = state.valid
    return TokenState(size=state.size, source=source, coords=coords, rules=dict(patch.rules),
                      protected=state.protected, valid=valid)


# ------------------------------------------------------------------------------------ patch / unpatch
def encoder_flops(config: Any) -> LayerFlops:
    """FLOPs model of a ViT-style layer from a HF config (hidden size, MLP ratio)."""
    return transformer_layer_flops(config.hidden_size, config.intermediate_size / config.hidden_size)


def patch_encoder(model: nn.Module, layers: Sequence[nn.Module], *, grid: TokenGrid, layout: MergeLayout,
                  r: ScheduleSpec, method: str = "tome", options: Optional[Mapping[str, Any]] = None,
                  prop_attn: Optional[bool] = None, trace_source: bool = False, output: str = "merged",
                  layer_flops: Optional[LayerFlops] = None, embed_index: Optional[Tensor] = None,
                  embed_tokens: Optional[int] = None, valid: Optional[Tensor] = None,
                  position_coords: Optional[Mapping[str, Tensor]] = None, rules: Optional[Mapping[str, str]] = None,
                  family: str = "encoder", extra: Optional[Mapping[str, Any]] = None) -> PatchSpec:
    """Patch ``layers`` (one encoder's layers, in order) of ``model``; atomic and reversible.

    Args:
        grid: token layout entering layer 0 after ``embed_index`` (the embeddings' tokens it keeps, e.g.
            AST columns that are padding in every clip; None keeps all ``embed_tokens``).
        layout: from ``plan_layout`` (order, groups, coordinate rule).
        r: any engine schedule spec, checked against what every layer can always remove.
        prop_attn: add ``log(size)`` to the attention logits; None: on, except for ``prune`` (every adapter's default).
        output: ``"merged"`` (the merged tokens) or ``"original"`` (one row per token entering layer 0, each
            holding its merged token: heads that average over tokens stay exact).
        valid: ``[B or 1, grid.num_tokens]`` bool in the model's token order: False marks padding.
        position_coords: ``[grid.num_tokens]`` coordinates of every position (model's order) with ``rules``,
            reported for the merged tokens by ``last_info`` when tracing.
    Everything is validated before the first change; a failure while patching undoes what was done. An
    already patched model is unpatched first (patches replace, never stack). ``unpatch`` restores it.
    """
    layers = list(layers)
    options = dict(options or {})
    parts = [layer_parts(layer) for layer in layers]  # TypeError before any change
    check_options(method, options, supplied=("layer_idx", "num_layers"))
    for name in ("noise", "score", "layer_idx", "num_layers"):
        if name in options:
            raise ValueError(f"option '{name}' is set by the encoder patch itself (per layer and call); leave it out")
    if output not in ("merged", "original"):
        raise ValueError(f"output must be 'merged' or 'original', got {output!r}")
    if prop_attn is None:  # every adapter's default: on, except for prune (nothing merged to weigh)
        prop_attn = method != "prune"
    P = grid.protected
    N = grid.num_tokens
    schedule = resolve_schedule(r, len(layers), N, P, method=method, grouping=layout.grouping,
                                layer_flops=layer_flops)
    partitions = layer_partitions(schedule, N, P, method, layout.grouping)
    merges = [i for i, ri in enumerate(schedule) if ri > 0]
    a0 = a_first(options.get("parity", "mergeable"), P)
    if not merges and embed_index is None and not trace_source:  # merging off: the model runs exactly as before
        spec = PatchSpec(method, options, layout.constraint, tuple(schedule), P, embed_tokens or N, N, prop_attn,
                         trace_source, output, len(layers), family=family, grid=grid, extra=dict(extra or {}))
        from mmmerge.patching import unpatch
        unpatch(model)
        model._mmmerge_patch = spec
        return spec

    # Static tensors, all in merge order. Entry: embeddings index -> protected, then the grid in merge order.
    order = layout.grid_order(grid)
    entry = torch.cat([torch.arange(P), P + order])
    if embed_index is not None:
        entry = embed_index[entry]
    reordered = layout.order is not None or embed_index is not None
    positions = grid.positions()
    head = torch.full((P,), -1, dtype=torch.long)
    time_rows = [torch.cat([head, positions[a][order]]) for a in layout.carried]
    exit_order = torch.argsort(torch.cat([torch.arange(P), P + order])) if layout.order is not None else None
    valid_entry = None
    if valid is not None:
        valid_entry = valid[:, torch.cat([torch.arange(P), P + order])]

    # Without merges only the entry (dropped padding) or the last layer (to record the state) is patched.
    first = 0 if reordered else merges[0] if merges else len(layers) - 1
    last = len(layers) - 1 if merges or not reordered else first
    carried = tuple(f"{a}_{end}" for a in layout.carried for end in ("min", "max"))
    span_rules = {name: name[-3:] for name in carried}
    spec = PatchSpec(method=method, options=options, constraint=layout.constraint, schedule=tuple(schedule),
                     protected=P, tokens=embed_tokens or N, entry_tokens=N, prop_attn=prop_attn,
                     trace_source=trace_source, output=output, first=first, last=last, carried=carried,
                     rules={**dict(rules or {}), **span_rules},
                     position_coords={k: v.float() for k, v in (position_coords or {}).items()},
                     entry=reordered, family=family, grid=grid, extra=dict(extra or {}))
    layer_specs, layer_buffers = [], []
    for i in range(first, last + 1):
        bias = prop_attn and bool(merges) and i > merges[0]
        active = bias or schedule[i] > 0
        core = parts[i].attention
        partition = None
        if schedule[i] > 0 and partitions[i] is not None:
            partition = replace(partitions[i], tables=GroupTables(_LayerBuffers(layers[i])))
        choose = None
        if schedule[i] > 0:
            per_layer = {"layer_idx": i, "num_layers": len(layers)} if method == "pitome" else {}
            choose = functools.partial(get_matcher(method), constraint=layout.constraint, partition=partition,
                                       **options, **per_layer)
        lspec = LayerSpec(patch=spec, index=i, r=schedule[i], partition=partition, bias=bias,
                          attn_config=_attention_config(core) if active else None,
                          base_attention=_base_attention(core, bias) if active else None, parts=parts[i],
                          choose=choose, fused=None if schedule[i] == 0 else fused_choice(
                              method, options, P, tokens_per_layer(schedule, N)[i],
                              1 if partition is None else partition.num_groups, isinstance(layout.constraint, Global),
                              valid is not None, bool(layout.carried), i, len(layers)))
        buffers: Dict[str, Tensor] = {}
        if i == first:
            if reordered:
                buffers["entry"] = entry
            if valid_entry is not None:
                buffers["valid"] = valid_entry.bool()
            if time_rows:
                buffers["time"] = torch.stack(time_rows)
        if i == last and exit_order is not None:
            buffers["exit"] = exit_order
        if lspec.partition is not None:
            buffers.update(group_tables(method, lspec.partition, a0))
        if lspec.fused is not None:
            buffers.update(fused_tables(method, tokens_per_layer(schedule, N)[i] - P, schedule[i],
                                        GroupTables(buffers)))
        layer_specs.append(lspec)
        layer_buffers.append(buffers)

    for layer, lspec in zip(layers[first:last + 1], layer_specs):
        _check_device_hooks(layer, lspec)
    from mmmerge.patching import unpatch
    unpatch(model)
    done: List[nn.Module] = []
    try:
        for layer, lspec, buffers in zip(layers[first:last + 1], layer_specs, layer_buffers):
            device = next(layer.parameters()).device
            layer.__class__ = merging_class(type(layer))
            if "_old_forward" in layer.__dict__:  # an accelerate hook: it calls the forward it saved
                layer._old_forward = functools.partial(_merging_forward, layer)
            done.append(layer)
            layer._mmmerge = lspec
            for name, tensor in buffers.items():
                layer.register_buffer(f"_mmmerge_{name}", tensor.to(device), persistent=False)
        model._mmmerge_patch = spec
    except Exception:
        for layer in done:
            _restore_layer(layer)
        model.__dict__.pop("_mmmerge_patch", None)
        raise
    return spec


def _check_device_hooks(layer: nn.Module, spec: LayerSpec) -> None:
    """Accelerate's hooks (``dispatch_model``, ``device_map``) replace a module's ``forward`` on the instance.
    On the layer itself the patch takes the hook's saved forward, so the hook still moves the layer's inputs
    (the token state included). The attention module's own forward is called through a per-call view, past
    any hook on it: such a model is refused, not silently left unmerged."""
    if spec.parts is None or spec.attn_config is None:
        return
    hooked = getattr(spec.parts.attention, "_hf_hook", None) is not None
    if hooked:
        raise ValueError(f"mmmerge: layer {spec.index}'s attention module carries an accelerate hook (a device_map "
                         "that splits inside an encoder layer); place each encoder layer on one device, e.g. "
                         "device_map='auto' with no_split_module_classes naming the layer class, then patch")


def _restore_layer(layer: nn.Module) -> None:
    for name in [n for n in layer._buffers if n.startswith("_mmmerge_")]:
        del layer._buffers[name]
        layer._non_persistent_buffers_set.discard(name)
    layer.__dict__.pop("_mmmerge", None)
    layer.__class__ = type(layer)._mmmerge_base
    if "_old_forward" in layer.__dict__:  # the accelerate hook calls the original forward again
        layer._old_forward = types.MethodType(type(layer).forward, layer)


def unpatch_encoder(model: nn.Module) -> bool:
    """Swap every patched layer of ``model`` back to its class and drop what the patch added. Returns
    whether anything was patched."""
    had = False
    for module in model.modules():
        had |= module.__dict__.pop("_mmmerge_patch", None) is not None
        if isinstance(module, MergingLayer):
            _restore_layer(module)
            had = True
    return had


def patch_spec(model: nn.Module) -> Optional[PatchSpec]:
    """The encoder patch in force on ``model``, or None."""
    return model.__dict__.get("_mmmerge_patch")


def _encoder_info(model: nn.Module) -> Optional[MergeInfo]:
    """``last_info`` of an encoder patch: on ``model`` itself, the LLaVA adapter's own record, or an encoder
    patched inside ``model`` (LLaVA's ``where="vision_tower"``); None without any."""
    if patch_spec(model) is not None:
        return merge_info(model)
    ctx = model.__dict__.get("_mmmerge")  # the LLaVA adapter keeps its own record
    if ctx is not None and hasattr(ctx, "info"):
        return ctx.info
    for module in model.modules():
        if patch_spec(module) is not None:
            return merge_info(module)
    return None


register_unpatch(unpatch_encoder)
register_info(_encoder_info)


def grid_features(model: nn.Module, last_hidden_state: Tensor, info: Optional[MergeInfo] = None) -> Tensor:
    """The encoder output spread back over its token grid: ``[B, *grid sizes, C]`` (protected tokens dropped).

    With ``output="original"`` the output already holds one row per token; otherwise each position gets the
    merged token that holds it, through the source map of ``info`` (default: this thread's last traced call,
    which needs ``trace_source=True``).
    """
    patch = patch_spec(model)
    if patch is None or patch.grid is None:
        raise ValueError(f"{type(model).__name__} is not patched by an mmmerge video or audio adapter")
    grid = patch.grid
    if last_hidden_state.dim() != 3:
        raise ValueError(f"last_hidden_state must be [B, N, C], got {tuple(last_hidden_state.shape)}")
    full = last_hidden_state
    if any(patch.schedule) and patch.output != "original":  # merged tokens: spread them by the source map
        info = info or merge_info(model)
        if info.state is None or info.state.source is None:
            raise ValueError("no source map: patch with trace_source=True (or output='original') and run a forward "
                             "first")
        full = unmerge(last_hidden_state, info.state)
    names = " ".join(name for name, _ in grid.axes)
    return rearrange(full[:, grid.protected:], f"b ({names}) c -> b {names} c", **dict(grid.axes))
