"""The shared patch for Hugging Face ViT-style encoder layers (ViViT, VideoMAE, AST, CLIP vision).

Where a token is merged, in one walk:
    layer input x  --norm1--> attention (+ log(size) bias) --> x = x + attn
                   --> keys captured from the layer's own key projection (head-averaged) = metric
                   --> mmmerge.plan_merge(metric, state, r_l)          (choose)
                   --> mmmerge.merge_tokens(x, state, plan)            (merge)
                   --norm2--> the layer's own MLP (+ residual)
The layer's own submodules do all the work; only the order of calls is ours. Modality adapters
(video, audio, llava) supply coordinates, constraints and pooling; they never touch layers directly.
"""
from __future__ import annotations

import copy
import inspect
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from mmmerge.attention import size_bias
from mmmerge.constraints import Constraint, Global
from mmmerge.matchers import get_matcher
from mmmerge.reduce import merge_tokens, plan_merge
from mmmerge.schedule import ScheduleSpec, resolve_schedule, transformer_layer_flops
from mmmerge.state import TokenState, init_state

try:  # transformers >= 4.48
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError:  # pragma: no cover - very old transformers
    ALL_ATTENTION_FUNCTIONS = None
    AttentionInterface = None

BIAS_BACKENDS = ("eager", "sdpa")  # attention functions that accept an additive float bias
_IMPL_NAME = "mmmerge"


# ------------------------------------------------------------------------------------ per-forward record
@dataclass
class MergeInfo:
    """What the last forward did. ``tokens_per_layer[l]`` is the input token count of layer l.

    With ``trace_source=True``: ``size`` ``[B, N]``, ``source`` ``[B, N0]`` and the full final ``state``
    (coordinates included) of the encoder's output tokens.
    """

    schedule: List[int]
    tokens_per_layer: List[int] = field(default_factory=list)
    size: Optional[Tensor] = None
    source: Optional[Tensor] = None
    state: Optional[TokenState] = None


@dataclass
class MergeContext:
    """Everything a patched model carries between layers during one forward."""

    schedule: List[int]
    method: str
    constraint: Constraint
    groups: int
    prop_attn: bool
    trace_source: bool
    protected: int
    coords: Dict[str, Tensor]  # [N0] each, on CPU; copied per device once
    rules: Dict[str, str]
    hyper: Dict[str, Any]
    num_layers: int
    first_merge_layer: int = 0  # layers after this one see merged tokens (and need the size bias)
    state: Optional[TokenState] = None
    valid: Optional[Tensor] = None  # [B, N0] bool for the next forward, set by an adapter (audio padding)
    info: MergeInfo = None  # type: ignore[assignment]
    _coords_by_device: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)

    def start(self, x: Tensor) -> None:
        """Fresh state for a new forward over ``x`` ``[B, N0, C]``."""
        B, N0 = x.shape[:2]
        expected = next(iter(self.coords.values())).shape[0] if self.coords else N0
        if N0 != expected:
            raise ValueError(
                f"the encoder got {N0} tokens but this patch was set up for {expected}; re-patch the model "
                "after changing the input size (frames, resolution, audio length) or masking"
            )
        key = str(x.device)
        if key not in self._coords_by_device:
            self._coords_by_device[key] = {k: v.to(x.device) for k, v in self.coords.items()}
        valid = self.valid
        if valid is not None and valid.shape != (B, N0):
            raise ValueError(f"valid mask must be [B, N0]=[{B}, {N0}], got {tuple(valid.shape)}")
        self.state = init_state(B, N0, device=x.device, protected=self.protected, trace_source=True,
                                coords=self._coords_by_device[key], rules=self.rules,
                                valid=None if valid is None else valid.to(x.device))
        self.info = MergeInfo(schedule=list(self.schedule))

    def finish(self) -> None:
        state = self.state
        if self.trace_source and state is not None:
            self.info.size, self.info.source, self.info.state = state.size, state.source, state
        if not self.trace_source:
            self.info.state = state.replace(source=None) if state is not None else None


# ------------------------------------------------------------------------------ layer anatomy (per family)
@dataclass
class LayerParts:
    """The pieces of one encoder layer, as the model's own callables."""

    norm1: nn.Module
    norm2: nn.Module
    attention: Callable[..., Tensor]  # (normed x, mask=None) -> attention output (before the residual add)
    feed_forward: Callable[[Tensor], Tensor]  # x -> x + mlp(norm2(x)) (residual included)
    core: nn.Module  # the module that calls the attention interface (owns config, key projection)
    key_proj: nn.Linear
    num_heads: int


def _first(obj: Any) -> Tensor:
    return obj[0] if isinstance(obj, (tuple, list)) else obj


def _attention_core(layer: nn.Module):
    for module in layer.modules():
        key = getattr(module, "k_proj", None) or getattr(module, "key", None)
        if isinstance(key, nn.Linear) and hasattr(module, "config"):
            heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
            if heads:
                return module, key, int(heads)
    return None


def layer_parts(layer: nn.Module) -> LayerParts:
    """Recognise a ViT-style HF layer and return its parts, or raise TypeError.

    Families: ViT/VideoMAE (``intermediate`` + ``output`` with the residual inside ``output``),
    ViViT/AST in transformers 5.x (``mlp`` + ``dropout``), CLIP (``layer_norm1``/``self_attn``/``mlp``).
    """
    found = _attention_core(layer)
    if found is None:
        raise TypeError(f"{type(layer).__name__} has no attention module with a key projection")
    core, key_proj, heads = found
    name = type(layer).__name__
    if hasattr(layer, "layernorm_before") and hasattr(layer, "attention"):
        def attend(h: Tensor, mask: Optional[Tensor] = None) -> Tensor:
            # The mask goes positionally, as the encoders call their layers (ViViT, AST); VideoMAE never has one.
            return _first(layer.attention(h) if mask is None else layer.attention(h, mask))
        dropout = getattr(layer, "dropout", None)
        if hasattr(layer, "intermediate") and hasattr(layer, "output"):
            def feed_forward(x: Tensor) -> Tensor:
                return layer.output(layer.intermediate(layer.layernorm_after(x)), x)
        elif hasattr(layer, "mlp"):
            def feed_forward(x: Tensor) -> Tensor:
                h = layer.mlp(layer.layernorm_after(x))
                return (dropout(h) if dropout is not None else h) + x
            if dropout is not None:
                attend_only = attend
                attend = lambda h, mask=None: dropout(attend_only(h, mask))  # noqa: E731
        else:
            raise TypeError(f"{name}: unrecognised MLP layout")
        return LayerParts(layer.layernorm_before, layer.layernorm_after, attend, feed_forward, core, key_proj, heads)
    if hasattr(layer, "layer_norm1") and hasattr(layer, "self_attn") and hasattr(layer, "mlp"):
        return LayerParts(
            layer.layer_norm1, layer.layer_norm2,
            lambda h, mask=None: _first(layer.self_attn(hidden_states=h, attention_mask=mask)),
            lambda x: x + layer.mlp(layer.layer_norm2(x)),
            core, key_proj, heads,
        )
    raise TypeError(f"{name} is not a ViT-style encoder layer mmmerge knows")


def encoder_layers(base: nn.Module) -> nn.ModuleList:
    """The layer list of a HF encoder model (``encoder.layer``, ``encoder.layers`` or ``layers``)."""
    for path in (("encoder", "layer"), ("encoder", "layers"), ("layers",)):
        obj: Any = base
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise TypeError(f"{type(base).__name__}: cannot find its encoder layers (encoder.layer / layers)")


# ---------------------------------------------------------------------------------- attention with bias
def _biased_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], **kwargs):
    """Attention function registered as "mmmerge": adds the module's pending size bias to the mask."""
    bias = module.__dict__.get("_mmmerge_bias")
    if bias is not None:
        bias = bias.to(query.dtype)
        attention_mask = bias if attention_mask is None else attention_mask + bias
    return module._mmmerge_base_attention(module, query, key, value, attention_mask, **kwargs)


if AttentionInterface is not None and _IMPL_NAME not in ALL_ATTENTION_FUNCTIONS:
    AttentionInterface.register(_IMPL_NAME, _biased_attention)


def _base_attention(core: nn.Module) -> Callable:
    impl = core.config._attn_implementation or "eager"
    if impl == _IMPL_NAME:  # already patched (re-patch): the base is the one the first patch found
        return core._mmmerge_base_attention
    if impl == "eager":
        fn = getattr(sys.modules[type(core).__module__], "eager_attention_forward", None)
        if fn is None:
            raise TypeError(f"{type(core).__name__}: cannot find its eager attention function")
        return fn
    if impl not in BIAS_BACKENDS:
        raise ValueError(
            f"attention backend '{impl}' cannot take the proportional-attention bias; load the model with "
            "attn_implementation='sdpa' or 'eager', or pass prop_attn=False"
        )
    return ALL_ATTENTION_FUNCTIONS[impl]


# ------------------------------------------------------------------------------------- matcher options
_SUPPLIED = ("metric", "state", "r", "constraint", "layer_idx", "num_layers")  # passed by the patch itself


def check_options(method: str, hyper: Dict[str, Any]) -> None:
    """Raise ValueError for a matcher option ``method`` does not take (a typo would be ignored silently)."""
    params = inspect.signature(get_matcher(method)).parameters
    known = sorted(name for name, p in params.items() if name not in _SUPPLIED
                   and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    unknown = sorted(set(hyper) - set(known))
    if unknown:
        raise ValueError(f"method '{method}' takes no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(known) or 'none'}")


# ---------------------------------------------------------------------------------------- patched layer
def _merged_forward(layer: nn.Module, ctx: MergeContext, index: int, parts: LayerParts,
                    hidden_states: Tensor, *args, **kwargs) -> Tensor:
    """Replacement ``forward`` of encoder layer ``index``: attention, merge, MLP.

    The layer body is a pure function of (hidden states, input token state), so it can run under the
    model's own gradient checkpointing: the backward recompute sees the same inputs and makes the same plan.
    """
    if index == 0:
        ctx.start(hidden_states)
    state = ctx.state
    if state is None or state.num_tokens != hidden_states.shape[1]:
        raise RuntimeError("mmmerge: encoder layers ran out of order; the first patched layer must run first")
    mask = args[0] if args else kwargs.get("attention_mask")
    if mask is not None and ctx.first_merge_layer < ctx.num_layers:
        # A padding mask is [B, 1, N0, N0]: it has no meaning for merged tokens, and merging would mix
        # padding into real tokens. Unmerged (r=0) it is passed on, so the off switch stays exact.
        raise ValueError("mmmerge cannot merge tokens under an attention mask; pass attention_mask=None "
                         "(or patch with r=0 to run the model unmerged with its mask)")
    ctx.info.tokens_per_layer.append(hidden_states.shape[1])
    r = ctx.schedule[index]
    use_bias = ctx.prop_attn and index > ctx.first_merge_layer

    def body(h: Tensor) -> Tuple[Tensor, TokenState]:
        keys: List[Tensor] = []
        hook = parts.key_proj.register_forward_hook(lambda m, i, o: keys.append(o)) if r > 0 else None
        if use_bias:
            parts.core._mmmerge_bias = size_bias(state.size)
        try:
            x = h + parts.attention(parts.norm1(h), mask)
        finally:
            if hook is not None:
                hook.remove()
            parts.core.__dict__.pop("_mmmerge_bias", None)
        new_state = state
        if r > 0:
            B, N = x.shape[:2]
            metric = keys[-1].detach().view(B, N, parts.num_heads, -1).mean(2)  # head-averaged keys [B, N, d]
            plan = plan_merge(metric, state, r, ctx.method, ctx.constraint, ctx.groups,
                              layer_idx=index, num_layers=ctx.num_layers, **ctx.hyper)
            x, new_state = merge_tokens(x, state, plan)
        return parts.feed_forward(x), new_state

    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        out, ctx.state = layer._gradient_checkpointing_func(body, hidden_states)
    else:
        out, ctx.state = body(hidden_states)
    if index == ctx.num_layers - 1:
        ctx.finish()
    return out


# ------------------------------------------------------------------------------------ patch / unpatch
def patch_layers(model: nn.Module, layers: Sequence[nn.Module], *, schedule: List[int], method: str = "tome",
                 constraint: Optional[Constraint] = None, groups: int = 1, prop_attn: bool = True,
                 trace_source: bool = False, protected: int = 0, coords: Optional[Dict[str, Tensor]] = None,
                 rules: Optional[Dict[str, str]] = None, hyper: Optional[Dict[str, Any]] = None,
                 install: Optional[Callable[[MergeContext], Sequence[Callable[[], None]]]] = None) -> MergeContext:
    """Patch ``layers`` (one encoder's layers, in order) of ``model``; atomic and reversible.

    Everything is validated before the first change; any failure while patching undoes what was done.
    ``install(ctx)`` lets an adapter add its own hooks (pooling, padding) inside the same atomic step; it
    returns their undo callables.
    An already patched model is unpatched first (patches replace, never stack). ``mmmerge.unpatch(model)``
    restores the original forwards and attention configs exactly.
    """
    layers = list(layers)
    if len(schedule) != len(layers):
        raise ValueError(f"schedule has {len(schedule)} entries for {len(layers)} layers")
    parts = [layer_parts(layer) for layer in layers]  # raises TypeError before any change
    check_options(method, dict(hyper or {}))
    merges = [i for i, r in enumerate(schedule) if r > 0]
    first_merge = merges[0] if merges else len(layers)
    bias_needed = prop_attn and first_merge < len(layers) - 1
    bases = [_base_attention(p.core) for p in parts] if bias_needed else []
    ctx = MergeContext(schedule=list(schedule), method=method, constraint=constraint or Global(), groups=groups,
                       prop_attn=prop_attn, trace_source=trace_source, protected=protected,
                       coords={k: torch.as_tensor(v, dtype=torch.float32).cpu() for k, v in (coords or {}).items()},
                       rules=dict(rules or {}), hyper=dict(hyper or {}), num_layers=len(layers),
                       first_merge_layer=first_merge)
    ctx.info = MergeInfo(schedule=list(schedule))

    from mmmerge.patching import unpatch
    unpatch(model)
    undo: List[Callable[[], None]] = []

    def restore() -> None:
        for step in reversed(undo):
            step()
        undo.clear()
        for name in ("_mmmerge", "_mmmerge_undo"):
            model.__dict__.pop(name, None)

    try:
        for index, (layer, p) in enumerate(zip(layers, parts)):
            had_forward = "forward" in layer.__dict__
            old_forward = layer.__dict__.get("forward")
            layer.forward = types.MethodType(
                lambda self, *a, _i=index, _p=p, **k: _merged_forward(self, ctx, _i, _p, *a, **k), layer)
            undo.append(lambda layer=layer, had=had_forward, old=old_forward:
                        setattr(layer, "forward", old) if had else layer.__dict__.pop("forward", None))
        for p, base in zip(parts, bases):
            # The core module gets its own config copy naming the biased attention function; the
            # model's config is untouched, so saving or reloading the model is unaffected.
            old_config = p.core.config
            new_config = copy.copy(old_config)
            new_config._attn_implementation_internal = _IMPL_NAME
            p.core.config = new_config
            p.core._mmmerge_base_attention = base
            undo.append(lambda core=p.core, cfg=old_config: (setattr(core, "config", cfg),
                                                             core.__dict__.pop("_mmmerge_base_attention", None)))
        if install is not None:
            undo.extend(install(ctx))
        model._mmmerge = ctx
        model._mmmerge_undo = restore
    except Exception:
        restore()
        raise
    return ctx


def encoder_schedule(r: ScheduleSpec, config: Any, num_layers: int, num_tokens: int, protected: int, method: str,
                     groups: int = 1, group_hint: str = "") -> List[int]:
    """Per-layer r for a ViT-style encoder (FLOPs model from its config); ``groups`` > 1 = per-group budgets.

    ``group_hint`` is appended to an infeasibility error when per-group budgets are on (say how to turn
    them off), since equal shares are the usual reason an otherwise fine r fails.
    """
    flops = transformer_layer_flops(config.hidden_size, config.intermediate_size / config.hidden_size)
    try:
        return resolve_schedule(r, num_layers, num_tokens, protected, method=method, multiple_of=groups,
                                layer_flops=flops)
    except ValueError as err:
        if groups > 1 and group_hint:
            raise ValueError(f"{err} ({group_hint})") from None
        raise


def weighted_mean(x: Tensor, size: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Size-weighted mean over tokens ``[B, N, C] -> [B, C]``: equals the plain mean over the originals."""
    w = size.to(x.dtype).unsqueeze(-1)
    if valid is not None:
        w = w * valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1)


def pooling_hook(ctx: MergeContext, norm: nn.Module, sequence_source: nn.Module) -> List[Callable[[], None]]:
    """Make a mean-pooling head size-weighted, without rewriting the head.

    A forward hook on ``sequence_source`` remembers its ``last_hidden_state``; a pre-hook on ``norm``
    (the head's norm after ``sequence_output.mean(1)``) swaps the plain mean for the size-weighted one.
    Returns the undo callables.
    """
    seen: Dict[str, Tensor] = {}

    def remember(module, inputs, output):
        seen["x"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else _first(output)

    def swap(module, inputs):
        x = seen.pop("x", None)
        if x is None or ctx.state is None or ctx.state.num_tokens != x.shape[1]:
            return None
        return (weighted_mean(x, ctx.state.size),)

    h1 = sequence_source.register_forward_hook(remember)
    h2 = norm.register_forward_pre_hook(swap)
    return [h1.remove, h2.remove]
