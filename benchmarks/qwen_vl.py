"""Qwen2.5-VL prefill with fewer visual tokens (random weights; GPU if available).

    python -m benchmarks.qwen_vl --size quick   # tiny Qwen2.5-VL on one 64x64 image (64 visual tokens), seconds
    python -m benchmarks.qwen_vl --size 7b      # Qwen2.5-VL-7B size in bf16, one 1288x728 image (1196 tokens, GPU)

Two tables, measured in one process, interleaved rounds after one warm-up, median of ``repeats``:
    prefill    keep 1.0 / 0.5 / 0.25 / 0.125 of the image's tokens with tome: latency of the whole prefill (tower,
               reduction, M-RoPE positions, LM over the prompt, last-token logits), of the LM part alone, the
               prefill tokens and the speedups against keep-all.
    reduction  the reduction itself (``reduce_items``: the engine call, cells, deepstack channels) as a fraction
               of the model's own ``get_image_features`` (tower and patch merger). Goal: below 5%.
Random weights: timings only.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Callable, Dict, List, Optional

import torch

from mmmerge.adapters import qwen_vl
from mmmerge.adapters.qwen_vl.kinds import host_grid
from mmmerge.adapters.qwen_vl.reduction import reduce_items

from .timing import markdown_table, seconds

PROMPT_TEXT = 40
KEEPS = (1.0, 0.5, 0.25, 0.125)
IMAGE_ID, VIDEO_ID, START, END = 151655, 151656, 151652, 151653


def build(size: str, device: torch.device, dtype: torch.dtype):
    """Qwen2.5-VL with random weights: the 7B shapes, or a tiny one (``quick``)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=START, vision_end_token_id=END)
    if size == "7b":
        text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                    rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]}, rope_theta=1e6)
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                      patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], spatial_merge_size=2,
                      temporal_patch_size=2, tokens_per_second=2)
    elif size == "quick":
        text = dict(vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2,
                    rope_scaling={"rope_type": "default", "mrope_section": [4, 2, 2]})
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64, patch_size=4,
                      window_size=16, fullatt_block_indexes=[1], spatial_merge_size=2, temporal_patch_size=2)
    else:
        raise ValueError(f"unknown size '{size}'; choose 7b or quick")
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return Qwen2_5_VLForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)


class Workload:
    """One prompt: ``PROMPT_TEXT`` text tokens around one image (1288 x 728 px at 7B size: grid 52 x 92)."""

    def __init__(self, model, size: str, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        vcfg = model.config.vision_config
        grid = [1, 52, 92] if size == "7b" else [1, 16, 16]
        channels = 3 * vcfg.temporal_patch_size * vcfg.patch_size ** 2
        g = torch.Generator().manual_seed(1)
        self.pixels = dict(pixel_values=torch.randn(grid[1] * grid[2], channels, generator=g).to(device, dtype),
                           image_grid_thw=torch.tensor([grid], device=device))
        self.full = grid[1] * grid[2] // 4
        text = torch.randint(1, 1000, (1, PROMPT_TEXT), generator=torch.Generator().manual_seed(0))
        ids = torch.cat([text[:, :5], torch.tensor([[START]]), torch.full((1, self.full), IMAGE_ID),
                         torch.tensor([[END]]), text[:, 5:]], 1).to(device)
        self.ids = ids
        self.types = (ids == IMAGE_ID).long()

    def patch(self, keep: float) -> Dict[str, torch.Tensor]:
        """Patch for ``keep`` and return the compacted inputs."""
        qwen_vl.restore_visual_tokens(self.model)
        qwen_vl.reduce_visual_tokens(self.model, keep=keep, method="tome")
        ids, mask, types = qwen_vl.compact_image_tokens(self.ids, None, self.model,
                                                        image_grid_thw=self.pixels["image_grid_thw"],
                                                        mm_token_type_ids=self.types)
        return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, **self.pixels)


def _median(fns: Dict[str, tuple], repeats: int) -> Dict[str, float]:
    """Interleaved rounds of ``(setup, fn)``: setup untimed before every timed fn; median seconds per fn."""
    for setup, fn in fns.values():
        setup()
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (setup, fn) in fns.items():
            setup()
            times[k].append(seconds(fn))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def run(size: str = "quick", repeats: int = 3) -> List[Dict[str, object]]:
    """Rows (flat dicts) of the prefill and reduction tables (``table`` says which)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(size, device, dtype)
    work = Workload(model, size, device, dtype)
    info = dict(size=size, device=device.type, dtype=str(dtype).replace("torch.", ""), image_tokens=work.full)
    inputs = {keep: work.patch(keep) for keep in KEEPS}
    fns: Dict[str, tuple] = {}
    for keep in KEEPS:
        emb = model.get_input_embeddings()(inputs[keep]["input_ids"])
        setup: Callable[[], object] = (lambda keep=keep: work.patch(keep))
        fns[f"whole_{keep}"] = (setup, lambda keep=keep: model(**inputs[keep], logits_to_keep=1))
        fns[f"lm_{keep}"] = (lambda: None, lambda emb=emb: model(inputs_embeds=emb, logits_to_keep=1))
    t = _median(fns, repeats)
    rows: List[Dict[str, object]] = []
    for keep in KEEPS:
        tokens = inputs[keep]["input_ids"].shape[1]
        rows.append({"table": "prefill", **info, "keep": keep, "prefill_tokens": tokens,
                     "prefill_ms": t[f"whole_{keep}"] * 1e3, "lm_ms": t[f"lm_{keep}"] * 1e3,
                     "speedup": t["whole_1.0"] / t[f"whole_{keep}"], "lm_speedup": t["lm_1.0"] / t[f"lm_{keep}"]})
    qwen_vl.restore_visual_tokens(model)
    grid = work.pixels["image_grid_thw"]
    tower = model.model.get_image_features(work.pixels["pixel_values"], grid)
    tokens = list(tower.pooler_output)
    for keep in KEEPS[1:]:
        qwen_vl.reduce_visual_tokens(model, keep=keep, method="tome")
        ctx = model.model._mmmerge_qwen
        items = ctx.items(host_grid(grid), False)
        qwen_vl.restore_visual_tokens(model)
        timed = _median({"tower": (lambda: None, lambda: model.model.get_image_features(
                             work.pixels["pixel_values"], grid)),
                         "reduce": (lambda: None, lambda: reduce_items(ctx, tokens, [], items, False))}, repeats)
        rows.append({"table": "reduction", **info, "keep": keep, "tower_ms": timed["tower"] * 1e3,
                     "reduction_ms": timed["reduce"] * 1e3, "fraction_of_tower": timed["reduce"] / timed["tower"]})
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("quick", "7b"), default="quick")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = run(args.size, args.repeats)
    for table, columns in (("prefill", ["keep", "prefill_tokens", "prefill_ms", "lm_ms", "speedup", "lm_speedup"]),
                           ("reduction", ["keep", "tower_ms", "reduction_ms", "fraction_of_tower"])):
        print(f"\n{table} ({rows[0]['size']}, {rows[0]['device']}, {rows[0]['dtype']}, "
              f"{rows[0]['image_tokens']} image tokens)\n")
        print(markdown_table([r for r in rows if r["table"] == table], columns))


if __name__ == "__main__":
    main()
