"""The anatomy of a Hugging Face ViT-style encoder layer, as the merging layer uses it: its parts (norms, the
attention module, the MLP) per family, and the per-call view of its attention module that adds ``log(size)`` to
the logits and hands back the head-averaged keys (the "mmmerge" attention function)."""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

try:  # transformers >= 4.48
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
except ImportError:  # pragma: no cover - very old transformers
    ALL_ATTENTION_FUNCTIONS = None
    AttentionInterface = None

BIAS_BACKENDS = ("eager", "sdpa")  # attention functions that accept an additive float bias
_IMPL_NAME = "mmmerge"


# ------------------------------------------------------------------------------------ attention, per call
class _AttentionCall:
    """One call's view of an attention module: the module's own ``forward`` runs with ``self`` seen
    through this object, which names the "mmmerge" attention function in its ``config`` and carries this
    call's size bias. Everything else is the module's (projections, heads, dropout, training flag)."""

    def __init__(self, module: nn.Module, config: Any, base: Callable, bias: Optional[Tensor], metric: bool):
        self.mmmerge_module = module
        self.config = config
        self.mmmerge_base = base
        self.mmmerge_bias = bias
        self.mmmerge_metric = metric

    def __getattr__(self, name: str) -> Any:  # only called for names not set in __init__
        return getattr(self.mmmerge_module, name)


def _mmmerge_attention(module: Any, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                       **kwargs):
    """Attention function "mmmerge": the base function (eager or sdpa) with ``log(size)`` added to the logits;
    returns the head-averaged keys ``[B, N, d]`` (ToMe's metric) in place of the attention weights."""
    bias = getattr(module, "mmmerge_bias", None)
    if bias is not None:
        bias = bias.to(query.dtype)
        attention_mask = bias if attention_mask is None else attention_mask + bias
    out, weights = module.mmmerge_base(module, query, key, value, attention_mask, **kwargs)
    if not getattr(module, "mmmerge_metric", False):
        return out, weights
    with torch.no_grad():  # matching builds no graph; similarities in float32 (bf16 and fp32 choose alike)
        return out, key.mean(1, dtype=torch.float32)


if AttentionInterface is not None and _IMPL_NAME not in ALL_ATTENTION_FUNCTIONS:
    AttentionInterface.register(_IMPL_NAME, _mmmerge_attention)


def _base_attention(core: nn.Module, prop_attn: bool) -> Callable:
    """The attention function ``core`` would use: its module's eager function, or a registered backend."""
    impl = core.config._attn_implementation or "eager"
    if impl == "eager":
        fn = getattr(sys.modules[type(core).__module__], "eager_attention_forward", None)
        if fn is None:
            raise TypeError(f"{type(core).__name__}: cannot find its eager attention function")
        return fn
    if prop_attn and impl not in BIAS_BACKENDS:
        raise ValueError(
            f"attention backend '{impl}' cannot take the proportional-attention bias; load the model with "
            "attn_implementation='sdpa' or 'eager', or pass prop_attn=False"
        )
    return ALL_ATTENTION_FUNCTIONS[impl]


def _attention_config(core: nn.Module) -> Any:
    """A copy of the attention module's config that names the "mmmerge" attention function (the model's
    own config is untouched, so saving and reloading are unaffected)."""
    config = copy.copy(core.config)
    config._attn_implementation_internal = _IMPL_NAME
    return config


# ------------------------------------------------------------------------------ layer anatomy (per family)
@dataclass(frozen=True)
class LayerParts:
    """The pieces of one encoder layer, as the model's own modules (found once at patch time and kept in the
    layer's ``LayerSpec``; a deep copy or a pickle of the model maps them to the copy's own)."""

    family: str  # "vit" (VideoMAE: self-attention + output modules), "vivit" (ViViT/AST 5.x), "clip" (CLIP/SigLIP)
    norm1: nn.Module
    norm2: nn.Module
    attention: nn.Module  # the module that calls the attention function
    num_heads: int


def _heads(module: nn.Module) -> Optional[int]:
    heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
    return int(heads) if heads else None


def layer_parts(layer: nn.Module) -> LayerParts:
    """Recognise a ViT-style HF layer and return its parts, or raise TypeError.

    Families: ViT/VideoMAE (``attention.attention`` + ``attention.output``, the residual inside
    ``output``), ViViT/AST in transformers 5.x (``attention`` with q/k/v/o projections, ``mlp`` +
    ``dropout``), CLIP/SigLIP (``layer_norm1``/``self_attn``/``mlp``).
    """
    name = type(layer).__name__
    if hasattr(layer, "layernorm_before") and hasattr(layer, "attention"):
        att = layer.attention
        if hasattr(att, "attention") and hasattr(att, "output") and hasattr(layer, "intermediate") \
                and hasattr(layer, "output") and _heads(att.attention) and hasattr(att.attention, "config"):
            return LayerParts("vit", layer.layernorm_before, layer.layernorm_after, att.attention, _heads(att.attention))
        if hasattr(att, "k_proj") and hasattr(layer, "mlp") and _heads(att) and hasattr(att, "config"):
            return LayerParts("vivit", layer.layernorm_before, layer.layernorm_after, att, _heads(att))
        raise TypeError(f"{name}: unrecognised attention/MLP layout")
    if hasattr(layer, "layer_norm1") and hasattr(layer, "self_attn") and hasattr(layer, "mlp"):
        att = layer.self_attn
        if _heads(att) and hasattr(att, "config"):
            return LayerParts("clip", layer.layer_norm1, layer.layer_norm2, att, _heads(att))
    raise TypeError(f"{name} is not a ViT-style encoder layer mmmerge knows")


def _attend(layer: nn.Module, parts: LayerParts, h: Tensor, call: _AttentionCall) -> Tuple[Tensor, Tensor]:
    """Attention branch of ``layer`` on normed tokens ``h``: ``(output before the residual add, metric)``."""
    forward = type(parts.attention).forward
    if parts.family == "vit":
        context, metric = forward(call, h)
        return layer.attention.output(context, h), metric
    out, metric = forward(call, h, None)
    if parts.family == "vivit":
        out = layer.dropout(out)
    return out, metric


def _feed_forward(layer: nn.Module, parts: LayerParts, x: Tensor) -> Tensor:
    """``x + mlp(norm2(x))`` with the layer's own modules (residual included)."""
    if parts.family == "vit":
        return layer.output(layer.intermediate(parts.norm2(x)), x)
    if parts.family == "vivit":
        return layer.dropout(layer.mlp(parts.norm2(x))) + x
    return x + layer.mlp(parts.norm2(x))


def encoder_layers(base: nn.Module) -> nn.ModuleList:
    """The layer list of a HF encoder model (``encoder.layer``, ``encoder.layers`` or ``layers``)."""
    for path in (("encoder", "layer"), ("encoder", "layers"), ("layers",)):
        obj: Any = base
        for attr in path:
            obj = getattr(obj, attr, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise TypeError(f"{type(base).__name__}: cannot find its encoder layers (encoder.layer / layers)")
