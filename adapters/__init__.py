"""Modality adapters (installed as ``mmmerge.adapters``).

    encoder.py  the shared patch for Hugging Face ViT-style encoder layers (ViViT, VideoMAE, AST, CLIP): the
                merging layer, its static plan, patch / unpatch, what a call did
    anatomy.py  an encoder layer's parts per family, and the per-call attention view (size bias, keys)
    layout.py   the token grid and how a time mode orders and groups it (plan_layout)
    video.py    ViViT / VideoMAE: time modes, load_video, frame_features, visualize
    audio.py    AST: band/time modes, padding, load_audio, features, column outputs, visualize
    llava/      LLaVA-1.5, NeXT, NeXT-Video, OneVision: reduce_visual_tokens before the language model (a package)
    qwen_vl/    Qwen2-VL / Qwen2.5-VL / Qwen3-VL: reduce_visual_tokens with M-RoPE positions kept
    vlm.py      what the VLM adapters share: the keep spec, methods replaced on an instance, processor patching
Importing this package registers every adapter with ``mmmerge.patch``.
"""
from . import audio  # noqa: F401
from . import llava  # noqa: F401
from . import qwen_vl  # noqa: F401
from . import video  # noqa: F401

__all__ = ["audio", "llava", "qwen_vl", "video"]
