"""Video adapter: constructed cases with a known exact answer (tiny random models, no network).

- Proportional attention: merging exact duplicate tokens with the ``log(size)`` bias must give the
  unmerged model's outputs for every original token, through the model's own eager and sdpa attention.
- Attention masks: the unmerged (r=0) patch passes them on; merging under a mask is refused up front.
- Coordinates: merged row/col are the centroids of the originals, spans their min/max.
- ``visualize``: every patch of a group gets the group's one colour, group borders are drawn.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import VideoMAEModel, VivitModel

import mmmerge
from mmmerge.adapters import video

from test_video import CLASSES, FRAMES, SIZE, TUBELET, clip, output, tiny


def duplicate_clip(batch: int = 2, seed: int = 5) -> torch.Tensor:
    """Tubelet 0 is one flat colour (its 16 patches are identical tokens); the rest is noise."""
    x = clip(batch, seed)
    x[:, :TUBELET] = torch.tensor([0.3, -0.2, 0.5]).view(1, 1, 3, 1, 1)
    return x


def no_position_embeddings(model: VideoMAEModel) -> VideoMAEModel:
    """VideoMAE without its (fixed, sinusoidal) position table, so equal patches are equal tokens."""
    model.embeddings.position_embeddings = torch.zeros_like(model.embeddings.position_embeddings)
    return model


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_merging_duplicates_with_size_bias_is_exact(attn):
    # Identical tokens stay identical in every layer, and attention over one token of size s with a
    # log(s) bias equals attention over its s copies: each original's output must be unchanged.
    model = no_position_embeddings(tiny(VideoMAEModel, attn))
    x = duplicate_clip()
    reference = output(model, x)  # [2, 64, 32]
    # Tubelet 0 holds 16 -> 12 -> 8 -> 6 -> 4 identical tokens: every merge is between copies
    schedule = [4, 4, 2, 2]
    results = {}
    for prop_attn in (True, False):
        mmmerge.patch(model, r=schedule, prop_attn=prop_attn, trace_source=True)
        merged = output(model, x)
        info = mmmerge.last_info(model)
        assert info.tokens_per_layer == [64, 60, 56, 54]
        results[prop_attn] = mmmerge.unmerge(merged, info.state)
        # every merge happened inside the flat tubelet (the test really merges copies)
        # (outputs are ordered by earliest original: tubelet 0's 4 survivors come first)
        assert torch.equal(info.size[:, 4:], torch.ones(2, 48)) and info.size[:, :4].sum() == 32
    mmmerge.unpatch(model)
    torch.testing.assert_close(results[True], reference, atol=2e-5, rtol=1e-5)
    # without the bias the copies are under-weighted in attention: the noise tokens' outputs move
    assert (results[False] - reference)[:, 16:].abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_mask_is_kept_unmerged_and_refused_when_merging(attn):
    model = tiny(VivitModel, attn)
    x = clip()
    mask = torch.ones(2, 65, dtype=torch.long)
    mask[:, 40:] = 0
    with torch.no_grad():
        reference = model(pixel_values=x, attention_mask=mask).last_hidden_state
        unmasked = model(pixel_values=x).last_hidden_state
    assert not torch.allclose(reference, unmasked, atol=1e-3)  # the mask matters
    mmmerge.patch(model, r=0)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x, attention_mask=mask).last_hidden_state, reference,
                                   atol=1e-6, rtol=0)
    mmmerge.patch(model, r=4)
    with pytest.raises(ValueError, match="attention mask"), torch.no_grad():
        model(pixel_values=x, attention_mask=mask)
    assert mmmerge.last_info(model).tokens_per_layer == []  # refused before the first layer ran


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_merged_coordinates_are_centroids_and_spans(cls):
    model = tiny(cls)
    mmmerge.patch(model, r=10, time_mode="adjacent", trace_source=True)
    output(model, clip())
    info = mmmerge.last_info(model)
    layout = video.video_layout(model)
    P, T, H, W = layout.protected, layout.frames, layout.rows, layout.cols
    t, row, col = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    original = {"t": t, "row": row, "col": col}
    source = info.source[:, P:]  # [B, T*H*W]: the output token holding each original patch
    for name, values in original.items():
        values = values.reshape(1, -1).float().expand_as(source)
        sums = torch.zeros_like(info.size).scatter_add_(1, source, values)
        torch.testing.assert_close(info.state.coords[name][:, P:], (sums / info.size)[:, P:])
    t_all = original["t"].reshape(1, -1).float().expand_as(source)
    lo = torch.full_like(info.size, 1e9).scatter_reduce(1, source, t_all, "amin")
    hi = torch.full_like(info.size, -1e9).scatter_reduce(1, source, t_all, "amax")
    assert torch.equal(info.state.coords["t_min"][:, P:], lo[:, P:])
    assert torch.equal(info.state.coords["t_max"][:, P:], hi[:, P:])
    assert (info.size[:, P:] > 1).any()  # something did merge


def test_visualize_paints_each_group_in_one_colour():
    model = tiny(VideoMAEModel)
    mmmerge.patch(model, r=12, trace_source=True)
    frames = torch.randint(0, 255, (FRAMES, SIZE, SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(pixel_values=frames.permute(0, 3, 1, 2).float().div(255).unsqueeze(0))
    info = mmmerge.last_info(model)
    image = np.asarray(video.visualize(frames, info, model=model, alpha=1.0)).astype(np.int64)  # pure group colours
    source = info.source[0].view(4, 4, 4)  # [tubelet, row, col] -> group
    patch = SIZE // 4
    centre = {}  # group -> colours of the interior pixel of its patches
    for t in range(4):
        for r in range(4):
            for c in range(4):
                pixel = image[r * patch + patch // 2, t * SIZE + c * patch + patch // 2]
                centre.setdefault(int(source[t, r, c]), []).append(tuple(pixel))
    merged = [g for g, colours in centre.items() if len(colours) > 1]
    assert merged, "some group must hold several patches"
    for g, colours in centre.items():
        assert len(set(colours)) == 1, f"group {g} is painted in {len(set(colours))} colours"
    # The painted colour is the group's mean colour on the frames shown (first frame of each tubelet).
    shown = frames[::TUBELET].float().view(4, 4, patch, 4, patch, 3).mean(dim=(2, 4))  # [T, H, W, 3]
    g = merged[0]
    members = shown[source == g]
    expected = np.round(members.mean(0).numpy()).astype(np.int64)
    assert np.abs(np.array(centre[g][0]) - expected).max() <= 1
    # Borders: white where neighbouring patches belong to different groups, none inside one group.
    for t in range(4):
        for r in range(4):
            for c in range(3):
                boundary = image[r * patch + patch // 2, t * SIZE + (c + 1) * patch]
                differs = source[t, r, c] != source[t, r, c + 1]
                if differs:
                    assert tuple(boundary) == (255, 255, 255)
                else:
                    assert tuple(boundary) == centre[int(source[t, r, c])][0]
