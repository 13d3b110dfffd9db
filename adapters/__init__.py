"""Modality adapters (installed as ``mmmerge.adapters``).

    encoder.py  the shared patch for Hugging Face ViT-style encoder layers (ViViT, VideoMAE, AST, CLIP)
    video.py    ViViT / VideoMAE: time modes, load_video, frame_features, visualize
Importing this package registers every adapter with ``mmmerge.patch``.
"""
from . import video  # noqa: F401

__all__ = ["video"]
