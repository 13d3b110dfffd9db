"""LLaVA prefill with fewer visual tokens (random weights; CPU by default, GPU if available).

    python -m benchmarks.llava                 # CLIP ViT-L/336 tower at real size + a small LLaMA-style LM (CPU)
    python -m benchmarks.llava --quick         # tiny models, seconds (smoke test)
    python -m benchmarks.llava --size 7b       # LLaVA-1.5-7B size in bf16 (needs a GPU)
    python -m benchmarks.llava --size next-7b  # LLaVA-NeXT-7B size in bf16, one 672x672 image (needs a GPU)
    python -m benchmarks.llava --size next-quick  # tiny LLaVA-NeXT (smoke test of the anyres path)
    python -m benchmarks.llava --size next-cpu    # LLaVA-NeXT tower at real size + the small LM (CPU, minutes)

Three tables, all measured in one process, interleaved rounds, one warm-up, median of ``repeats``:
    prefill    LLaVA-1.5: keep 576 / 192 / 144 / 64; LLaVA-NeXT: 2880 / 640 / 320 / 160 feature tokens of one
               672 x 672 image (base view + 4 crops; its 48 newline tokens stay on top), tome after the projector:
               latency of the whole prefill (tower, reduction, projector, LM over the prompt, last-token logits)
               and of the LM part alone, tokens/s, speedups against keep-all and the ratio of prefill tokens.
               Goal: LM prefill speedup >= 0.8x the token ratio.
    reduction  cost of the reduction itself (keys + scores from the captured projections, matching, merging)
               as a fraction of one vision-tower forward. Goal: below 5%.
    stage      (LLaVA-1.5) reduce before vs after the projector (where="pre_projector" / "post_projector"):
               latency, and fidelity against keep-all (cosine of the LM's last hidden state and of the
               next-token distribution).
Random weights make fidelity figures a sanity check only; timings on a shared CPU are noisy.
"""
from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from mmmerge.adapters import llava

from .timing import machine, markdown_table, seconds

PROMPT_TEXT = 40  # text tokens around the image
SECTIONS = ("prefill", "reduction", "stage")


SIZES = ("quick", "cpu", "7b", "next-quick", "next-cpu", "next-7b")
NEXT_PINPOINTS = [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]  # llava-v1.6 grids, in tiles


def build(size: str, device: torch.device, dtype: torch.dtype):
    """LLaVA model from configs (random weights), built on ``device``. ``quick``: tiny; ``cpu``: ViT-L/336 +
    8-layer 1024-wide LM; ``7b``: ViT-L/336 + LLaMA-7B (LLaVA-1.5-7B); ``next-quick``: tiny LLaVA-NeXT;
    ``next-cpu``: ViT-L/336 with llava-v1.6's anyres grids + the ``cpu`` LM; ``next-7b``: ViT-L/336 + LLaMA-7B
    with llava-v1.6's anyres grids (LLaVA-NeXT-7B)."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaNextConfig, LlavaNextForConditionalGeneration)

    if size not in SIZES:
        raise ValueError(f"unknown size '{size}'; choose one of {', '.join(SIZES)}")
    torch.manual_seed(0)
    if size in ("quick", "next-quick"):
        vision = CLIPVisionConfig(image_size=56, patch_size=7, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=4, num_attention_heads=4)
        text = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4)
    else:
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                                  num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
        if size in ("cpu", "next-cpu"):
            text = LlamaConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                               num_attention_heads=16, num_key_value_heads=16)
        else:
            text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=32)
    common = dict(vision_config=vision, text_config=text, image_token_id=text.vocab_size - 1,
                  vision_feature_layer=-2, vision_feature_select_strategy="default")
    if size.startswith("next"):
        tile = vision.image_size
        config = LlavaNextConfig(image_grid_pinpoints=[[h * tile, w * tile] for h, w in NEXT_PINPOINTS], **common)
        cls = LlavaNextForConditionalGeneration
    else:
        config, cls = LlavaConfig(**common), LlavaForConditionalGeneration
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()


def _median(fns: Dict[str, object], repeats: int) -> Dict[str, float]:
    """Interleaved rounds: every fn once per round (after one warm-up each); median seconds per fn.

    A value is a callable, or ``(setup, fn)``: ``setup()`` runs untimed before every timed ``fn()`` (re-patching
    the model for this fn's keep, which is host-side work outside the forward)."""
    pairs = {k: v if isinstance(v, tuple) else (None, v) for k, v in fns.items()}
    for setup, fn in pairs.values():
        if setup is not None:
            setup()
        fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (setup, fn) in pairs.items():
            if setup is not None:
                setup()
            times[k].append(seconds(fn))
    return {k: statistics.median(v) for k, v in times.items()}


class Workload:
    """One prompt: ``PROMPT_TEXT`` text tokens around one image, for LLaVA-1.5 (576 tokens at 336 px) or
    LLaVA-NeXT (a square image of 2 x 2 tiles: base view + 4 crops, 2880 feature tokens and 48 newlines)."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.next = type(model).__name__.startswith("LlavaNext")
        vcfg = model.config.vision_config
        tile = vcfg.image_size
        self.pixels: Dict[str, torch.Tensor] = {}
        g = torch.Generator().manual_seed(1)
        if self.next:
            self.pixels["pixel_values"] = torch.randn(1, 5, 3, tile, tile, generator=g).to(device, dtype)
            self.pixels["image_sizes"] = torch.tensor([[2 * tile, 2 * tile]])
            with torch.no_grad():
                packed = model.model.get_image_features(**self.pixels).pooler_output[0]
            self.newlines = 2 * (tile // vcfg.patch_size)
            self.full = packed.shape[0] - self.newlines  # feature tokens (2880 at 336 px)
            self.placeholders = packed.shape[0]
        else:
            self.pixels["pixel_values"] = torch.randn(1, 3, tile, tile, generator=g).to(device, dtype)
            self.newlines = 0
            self.full = self.placeholders = (tile // vcfg.patch_size) ** 2
        image_id = model.config.image_token_id
        text = torch.randint(1, image_id - 1, (1, PROMPT_TEXT), generator=torch.Generator().manual_seed(0))
        self.full_ids = torch.cat([text[:, :5], torch.full((1, self.placeholders), image_id), text[:, 5:]], 1)
        self.full_ids = self.full_ids.to(device)
        F_ = self.full
        self.keeps = [576, 192, 144, 64] if F_ == 576 else [2880, 640, 320, 160] if F_ == 2880 else \
            [F_, F_ * 2 // 9, F_ // 9, F_ // 18] if self.next else [F_, F_ // 3, F_ // 4, F_ // 9]

    def patch(self, keep: int, method: str = "tome", where: str = "post_projector") -> torch.Tensor:
        """Patch for ``keep`` and return the compacted input ids."""
        llava.restore_visual_tokens(self.model)
        llava.reduce_visual_tokens(self.model, keep=keep, method=method, where=where)
        sizes = self.pixels.get("image_sizes")
        ids, _ = llava.compact_image_tokens(self.full_ids, None, self.model, image_sizes=sizes)
        return ids

    def tokens(self, keep: int) -> int:
        """Prefill tokens at ``keep``: text, kept visual tokens, newlines."""
        return PROMPT_TEXT + keep + self.newlines


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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = size or ("quick" if quick else ("7b" if device.type == "cuda" else "cpu"))
    if size.startswith("next"):
        sections = [s for s in sections if s != "stage"]  # LLaVA-NeXT reduces after the projector only
    if progress is not None:
        progress.reset(total=len(sections))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    repeats = 1 if quick else repeats
    model = build(size, device, dtype)
    work = Workload(model, device, dtype)
    keeps, N = work.keeps, work.full
    rows: List[Dict[str, object]] = []
    info = dict(size=size, device=device.type, dtype=str(dtype).replace("torch.", ""))

    def done(section: str) -> None:
        if progress is not None:
            progress.set_postfix_str(section)
            progress.update(1)

    # ---- prefill: whole model and LM alone, keep-all vs reduced, interleaved in one loop.
    fns: Dict[str, Callable[[], object]] = {}
    for keep in (keeps if "prefill" in sections else []):
        ids = work.patch(keep)
        emb = model.model.get_input_embeddings()(ids)  # the LM's cost depends on the length only

        def whole(ids=ids):
            return model(input_ids=ids, **work.pixels, logits_to_keep=1)

        fns[f"whole_{keep}"] = (functools.partial(work.patch, keep), whole)
        fns[f"lm_{keep}"] = lambda emb=emb: model(inputs_embeds=emb, logits_to_keep=1)
    t = _median(fns, repeats)
    for keep in (keeps if "prefill" in sections else []):
        ratio = work.tokens(N) / work.tokens(keep)
        rows.append({"table": "prefill", **info, "keep": keep, "prefill_tokens": work.tokens(keep),
                     "token_ratio": ratio, "prefill_ms": t[f"whole_{keep}"] * 1e3,
                     "lm_ms": t[f"lm_{keep}"] * 1e3, "tokens_per_s": work.tokens(keep) / t[f"whole_{keep}"],
                     "speedup": t[f"whole_{N}"] / t[f"whole_{keep}"], "lm_speedup": t[f"lm_{N}"] / t[f"lm_{keep}"],
                     "lm_efficiency": (t[f"lm_{N}"] / t[f"lm_{keep}"]) / ratio})
    if "prefill" in sections:
        done("prefill")

    if "reduction" in sections:
        rows += _reduction_rows(work, keeps, quick, repeats, info)
        done("reduction")
    if "stage" in sections:
        rows += _stage_rows(work, keeps, quick, repeats, info)
        done("stage")
    llava.restore_visual_tokens(model)
    if out_dir is not None:
        import json
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"llava_{size}.json").write_text(json.dumps(rows, indent=1))
    return rows


def _reduction_rows(work: Workload, keeps, quick, repeats, info) -> List[Dict[str, object]]:
    """Cost of the reduction itself (the feature layer's keys and score, recomputed from its input, and the
    engine's reduction) against one vision-tower forward (with the hidden states LLaVA asks for)."""
    rows: List[Dict[str, object]] = []
    model = work.model
    llava.restore_visual_tokens(model)
    lm = model.model
    layout = llava.kinds.tower_layout(lm)
    tower = lm.vision_tower
    pixels = work.pixels["pixel_values"]
    pixels = pixels.flatten(0, 1) if pixels.dim() == 5 else pixels  # NeXT: every tile is one tower input
    kind = llava.model_kind(model)
    out = tower(pixels, output_hidden_states=True)
    d = layout.drop
    x = out.hidden_states[layout.feature_layers[0]][:, d:]
    methods = ("tome", "pitome", "tps", "dominant") if not quick else ("tome", "dominant")
    fns = {"tower": lambda: tower(pixels, output_hidden_states=True)}
    for method in methods:
        scored = method in llava.SCORED
        for keep in ((keeps[3],) if quick else (keeps[2], keeps[3])):
            ctx = llava.LlavaContext(kind=kind, keep=keep, keep_tokens=keep, method=method, where="post_projector",
                                     layout=layout, time_mode="global", hyper={})
            if work.next:  # the packed tokens of the image; keys and scores of its tiles, gathered to them
                image = ctx.image_layout(lm, work.pixels["image_sizes"][0].tolist(), True, None)
                plan = llava.anyres.ragged_plan(ctx, [image], x.device)
                tokens = torch.cat(list(lm.get_image_features(**work.pixels).pooler_output))

                def reduce(ctx=ctx, plan=plan, tokens=tokens, scored=scored):
                    keys, score = llava.reduction.keys_and_scores(lm, layout, out.hidden_states, scored)
                    metric = keys[:, d:].flatten(0, 1)[plan.origin]
                    score = None if score is None else score[:, d:].flatten()[plan.origin]
                    return llava.reduction.reduce_ragged(ctx, tokens, metric, score, plan)
            else:
                def reduce(ctx=ctx, keep=keep, scored=scored):
                    keys, score = llava.reduction.keys_and_scores(lm, layout, out.hidden_states, scored)
                    return llava.reduction.reduce_rows(ctx, x, keys[:, d:], None if score is None else score[:, d:], keep,
                                         layout.protected)
            fns[f"{method}_{keep}"] = reduce
    t = _median(fns, repeats)
    for name, sec in t.items():
        if name != "tower":
            method, keep = name.rsplit("_", 1)
            rows.append({"table": "reduction", **info, "method": method, "keep": int(keep), "reduce_ms": sec * 1e3,
                         "tower_ms": t["tower"] * 1e3, "fraction_of_tower": sec / t["tower"]})
    return rows


def _stage_rows(work: Workload, keeps, quick, repeats, info) -> List[Dict[str, object]]:
    """Before vs after the projector: speed of the image features and fidelity against keep-all."""
    rows: List[Dict[str, object]] = []
    model = work.model
    llava.restore_visual_tokens(model)
    pixels = work.pixels["pixel_values"]
    ref = model(input_ids=work.full_ids, pixel_values=pixels, output_hidden_states=True, logits_to_keep=1)
    ref_h, ref_p = ref.hidden_states[-1][:, -1].float(), ref.logits[:, -1].float().softmax(-1)
    fns, fidelity = {}, {}
    for method in (("tome",) if quick else ("tome", "dominant")):
        for keep in ((keeps[3],) if quick else (keeps[2], keeps[3])):
            for where in ("pre_projector", "post_projector"):
                ids = work.patch(keep, method, where)
                o = model(input_ids=ids, pixel_values=pixels, output_hidden_states=True, logits_to_keep=1)
                fidelity[(method, keep, where)] = (
                    F.cosine_similarity(o.hidden_states[-1][:, -1].float(), ref_h).item(),
                    F.cosine_similarity(o.logits[:, -1].float().softmax(-1), ref_p).item())

                fns[(method, keep, where)] = (functools.partial(work.patch, keep, method, where),
                                              functools.partial(model.model.get_image_features, pixels))
    t = _median(fns, repeats)
    for key, sec in t.items():
        method, keep, where = key
        rows.append({"table": "stage", **info, "method": method, "keep": keep, "stage": where,
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
    parser.add_argument("--size", choices=SIZES, default=None, help="model size (default: cpu, or 7b on a GPU); "
                        "next-7b: LLaVA-NeXT-7B, needs a GPU")
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
        chosen = [r for r in rows if r["table"] == table]
        if chosen:
            print(f"\n{table}\n" + markdown_table(chosen, COLUMNS[table]))


if __name__ == "__main__":
    main()
