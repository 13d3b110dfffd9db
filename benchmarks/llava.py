"""LLaVA prefill with fewer visual tokens (random weights; CPU by default, GPU if available).

    python -m benchmarks.llava            # CLIP ViT-L/336 tower at real size + a small LLaMA-style LM (CPU)
    python -m benchmarks.llava --quick    # tiny models, seconds (smoke test)
    python -m benchmarks.llava --size 7b  # LLaVA-1.5-7B size in bf16 (needs a GPU)

Three tables, all measured in one process, interleaved rounds, one warm-up, median of ``repeats``:
    prefill    keep 576 / 192 / 144 / 64 (tome, post_projector): latency of the whole prefill (tower,
               reduction, projector, LM over the prompt, last-token logits) and of the LM part alone, tokens/s,
               speedups against keep-all and the ratio of prefill tokens. Goal (issue 5): LM prefill speedup at
               keep=64 >= 0.8x the token ratio.
    reduction  cost of the reduction itself (keys + [CLS] attention from the captured projections, matching,
               merging) as a fraction of one vision-tower forward. Goal: below 5%.
    stage      reduce before vs after the projector: latency, and fidelity against keep-all (cosine of the
               LM's last hidden state, and of the next-token distribution).
Random weights make fidelity figures a sanity check only; timings on a shared CPU are noisy.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from mmmerge.adapters import llava

from .timing import machine, markdown_table, seconds

PROMPT_TEXT = 40  # text tokens around the image
SECTIONS = ("prefill", "reduction", "stage")


def build(size: str, device: torch.device, dtype: torch.dtype):
    """LLaVA model from configs (random weights). ``quick``: tiny; ``cpu``: ViT-L/336 + 8-layer 1024-wide LM;
    ``7b``: ViT-L/336 + LLaMA-7B (LLaVA-1.5-7B)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    if size == "quick":
        vision = CLIPVisionConfig(image_size=56, patch_size=7, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, num_attention_heads=4)
        text = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4)
    else:
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
        if size == "cpu":
            text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                               num_attention_heads=16, num_key_value_heads=16)
        elif size == "7b":
            text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32)
        else:
            raise ValueError(f"unknown size '{size}'; choose quick, cpu or 7b")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 1,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).to(device, dtype).eval()
    return model


def _median(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Interleaved rounds: every fn once per round (after one warm-up each); median seconds per fn."""
    for fn in fns.values():
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(seconds(fn))
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def run(out_dir: Optional[Path] = None, quick: bool = False, size: Optional[str] = None,
        repeats: int = 3, threads: Optional[int] = 1, sections: Sequence[str] = SECTIONS,
        progress=None) -> List[Dict[str, object]]:
    """Rows (flat dicts) of the tables in ``sections`` (prefill, reduction, stage); ``table`` says which.

    ``threads``: torch CPU threads for the whole run (1 by default: a shared CPU; None leaves torch's choice).
    ``progress``: optional tqdm-like bar, advanced once per section.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if threads:
        torch.set_num_threads(threads)
    if progress is not None:
        progress.reset(total=len(sections))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = size or ("quick" if quick else ("7b" if device.type == "cuda" else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = 1 if quick else repeats
    model = build(size, device, dtype)
    lm = model.model
    vcfg = model.config.vision_config
    N = (vcfg.image_size // vcfg.patch_size) ** 2
    keeps = [N, N // 3, N // 4, N // 9] if N != 576 else [576, 192, 144, 64]
    image_id = model.config.image_token_id
    text = torch.randint(1, image_id - 1, (1, PROMPT_TEXT), generator=torch.Generator().manual_seed(0))
    full_ids = torch.cat([text[:, :5], torch.full((1, N), image_id), text[:, 5:]], 1).to(device)
    pixels = torch.randn(1, 3, vcfg.image_size, vcfg.image_size, generator=torch.Generator().manual_seed(1))
    pixels = pixels.to(device, dtype)
    rows: List[Dict[str, object]] = []
    info = dict(size=size, device=device.type, dtype=str(dtype).replace("torch.", ""))

    def inputs_for(keep: int, method: str = "tome", stage: str = "post_projector"):
        llava.restore_visual_tokens(model)
        llava.reduce_visual_tokens(model, keep=keep, method=method, stage=stage)
        ids, _ = llava.compact_image_tokens(full_ids, None, model)
        return ids

    def embeds_for(keep: int) -> torch.Tensor:
        ids = inputs_for(keep)
        return lm.get_input_embeddings()(ids)  # the LM's cost depends on the length only

    def done(section: str) -> None:
        if progress is not None:
            progress.set_postfix_str(section)
            progress.update(1)

    # ---- prefill: whole model and LM alone, keep-all vs reduced, interleaved in one loop.
    fns: Dict[str, Callable[[], object]] = {}
    for keep in (keeps if "prefill" in sections else []):
        ids = inputs_for(keep)
        emb = embeds_for(keep)
        llava.restore_visual_tokens(model)

        def whole(ids=ids, ctx_keep=keep):
            llava.restore_visual_tokens(model)
            llava.reduce_visual_tokens(model, keep=ctx_keep)
            return model(input_ids=ids, pixel_values=pixels, logits_to_keep=1)

        fns[f"whole_{keep}"] = whole
        fns[f"lm_{keep}"] = lambda emb=emb: model(inputs_embeds=emb, logits_to_keep=1)
    t = _median(fns, repeats)
    tokens = {k: PROMPT_TEXT + k for k in keeps}
    for keep in (keeps if "prefill" in sections else []):
        rows.append({"table": "prefill", **info, "keep": keep, "prefill_tokens": tokens[keep],
                     "token_ratio": tokens[N] / tokens[keep], "prefill_ms": t[f"whole_{keep}"] * 1e3,
                     "lm_ms": t[f"lm_{keep}"] * 1e3, "tokens_per_s": tokens[keep] / t[f"whole_{keep}"],
                     "speedup": t[f"whole_{N}"] / t[f"whole_{keep}"], "lm_speedup": t[f"lm_{N}"] / t[f"lm_{keep}"],
                     "lm_efficiency": (t[f"lm_{N}"] / t[f"lm_{keep}"]) / (tokens[N] / tokens[keep])})
    if "prefill" in sections:
        done("prefill")

    if "reduction" in sections:
        rows += _reduction_rows(model, pixels, keeps, quick, repeats, info)
        done("reduction")
    if "stage" in sections:
        rows += _stage_rows(model, full_ids, pixels, keeps, quick, repeats, info, inputs_for)
        done("stage")
    llava.restore_visual_tokens(model)
    if out_dir is not None:
        import json
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"llava_{size}.json").write_text(json.dumps(rows, indent=1))
    return rows


def _reduction_rows(model, pixels, keeps, quick, repeats, info) -> List[Dict[str, object]]:
    """Cost of the reduction itself against one vision-tower forward (with the hidden states LLaVA asks for)."""
    rows: List[Dict[str, object]] = []
    llava.restore_visual_tokens(model)
    lm = model.model
    layout = llava._layout(lm)
    tower = lm.vision_tower
    with llava._Capture(lm, layout, True) as cap:
        out = tower(pixels, output_hidden_states=True)
    x = out.hidden_states[layout.feature_layers[0]][:, 1:]
    methods = ("tome", "pitome", "tps", "dominant") if not quick else ("tome", "dominant")
    fns = {"tower": lambda: tower(pixels, output_hidden_states=True)}
    for method in methods:
        for keep in ((keeps[3],) if quick else (keeps[2], keeps[3])):
            ctx = llava.LlavaContext("image", keep, keep, method, "pre_llm", "pre_projector", layout, "global", 1,
                                     None, {})

            def reduce(ctx=ctx, keep=keep):
                keys, cls_attn = cap.keys_and_cls_attention(1)
                return llava._reduce(ctx, x, keys[:, 1:], cls_attn[:, 1:], keep, 0)

            fns[f"{method}_{keep}"] = reduce
    t = _median(fns, repeats)
    for name, sec in t.items():
        if name != "tower":
            method, keep = name.rsplit("_", 1)
            rows.append({"table": "reduction", **info, "method": method, "keep": int(keep), "reduce_ms": sec * 1e3,
                         "tower_ms": t["tower"] * 1e3, "fraction_of_tower": sec / t["tower"]})
    return rows


def _stage_rows(model, full_ids, pixels, keeps, quick, repeats, info, inputs_for) -> List[Dict[str, object]]:
    """Before vs after the projector: speed of the image features and fidelity against keep-all."""
    rows: List[Dict[str, object]] = []
    llava.restore_visual_tokens(model)
    ref = model(input_ids=full_ids, pixel_values=pixels, output_hidden_states=True, logits_to_keep=1)
    ref_h, ref_p = ref.hidden_states[-1][:, -1].float(), ref.logits[:, -1].float().softmax(-1)
    fns, fidelity = {}, {}
    for method in (("tome",) if quick else ("tome", "dominant")):
        for keep in ((keeps[3],) if quick else (keeps[2], keeps[3])):
            for stage in llava.STAGES:
                ids = inputs_for(keep, method, stage)
                o = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True, logits_to_keep=1)
                fidelity[(method, keep, stage)] = (
                    F.cosine_similarity(o.hidden_states[-1][:, -1].float(), ref_h).item(),
                    F.cosine_similarity(o.logits[:, -1].float().softmax(-1), ref_p).item())

                def whole(ids=ids, method=method, keep=keep, stage=stage):
                    llava.restore_visual_tokens(model)
                    llava.reduce_visual_tokens(model, keep=keep, method=method, stage=stage)
                    return model.model.get_image_features(pixels)

                fns[(method, keep, stage)] = whole
    t = _median(fns, repeats)
    for key, sec in t.items():
        method, keep, stage = key
        rows.append({"table": "stage", **info, "method": method, "keep": keep, "stage": stage,
                     "features_ms": sec * 1e3, "hidden_cos": fidelity[key][0], "probs_cos": fidelity[key][1]})
    return rows


COLUMNS = {
    "prefill": ["keep", "prefill_tokens", "token_ratio", "prefill_ms", "speedup", "tokens_per_s", "lm_ms",
                "lm_speedup", "lm_efficiency"],
    "reduction": ["method", "keep", "reduce_ms", "tower_ms", "fraction_of_tower"],
    "stage": ["method", "keep", "stage", "features_ms", "hidden_cos", "probs_cos"],
}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", choices=["quick", "cpu", "7b"], default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the whole run (default 1, for "
                        "a shared CPU; 0 leaves torch's default)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        help="tables to measure (default: all three)")
    args = parser.parse_args(argv)
    rows = run(args.out, quick=args.quick, size=args.size, repeats=args.repeats, threads=args.threads or None,
               sections=args.sections)
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; batch 1, one image, {PROMPT_TEXT} text "
          f"tokens, random weights, size={rows[0]['size']}, {rows[0]['dtype']}; median of {1 if args.quick else args.repeats} "
          "interleaved runs (a shared CPU is noisy)")
    for table in args.sections:
        print(f"\n{table}\n" + markdown_table([r for r in rows if r["table"] == table], COLUMNS[table]))


if __name__ == "__main__":
    main()
