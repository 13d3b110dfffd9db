"""LLaVA prefill with fewer visual tokens (random weights; CPU by default, GPU if available).

    python -m benchmarks.llava                 # CLIP ViT-L/336 tower at real size + a small LLaMA-style LM (CPU)
    python -m benchmarks.llava --quick         # tiny models, seconds (smoke test)
    python -m benchmarks.llava --size 7b       # LLaVA-1.5-7B size in bf16 (needs a GPU)
    python -m benchmarks.llava --size next-7b  # LLaVA-NeXT-7B size in bf16, one 672x672 image (needs a GPU)
    python -m benchmarks.llava --size next-quick  # tiny LLaVA-NeXT (smoke test of the anyres path)
    python -m benchmarks.llava --size next-cpu    # LLaVA-NeXT tower at real size + the small LM (CPU, minutes)
    python -m benchmarks.llava --batch 1 8        # prefill rows at these batch sizes (default: 1 and 8)
    python -m benchmarks.llava --sections compiled  # the compiled rows (torch.compile of the LM; slow to build)

Tables, all measured in one process, interleaved rounds, one warm-up, median of ``repeats``:
    prefill    LLaVA-1.5: keep 576 / 192 / 144 / 64; LLaVA-NeXT: 2880 / 640 / 320 / 160 feature tokens of one
               672 x 672 image (base view + 4 crops; its 48 newline tokens stay on top), tome after the projector,
               one image per prompt, at every ``--batch``: latency of the whole prefill (tower, reduction,
               projector, LM over the prompt, last-token logits) and of the LM part alone (the ceiling: the LM at
               the full and at the reduced length), tokens/s, speedups against keep-all and the token ratio.
               Goal: LM prefill speedup >= 0.8x the token ratio.
    reduction  cost of the reduction itself, measured through the public entry point only: the reduced
               ``get_image_features`` against the unreduced one (tower, projector, packing) on the same pixels:
               its time (difference of medians), its dispatched aten ops (``mmmerge.count_ops``; on a GPU at small
               batch each is a kernel launch) and its host time with the model on the meta device (no kernel runs:
               the Python and dispatch cost that a GPU cannot hide), each as a share of the unreduced call. Steady
               state: one untimed call after patching builds what is built once per input shape.
               Goal: below 5%.
    stage      (LLaVA-1.5) reduce before vs after the projector (where="pre_projector" / "post_projector"):
               latency, and fidelity against keep-all (cosine of the LM's last hidden state and of the
               next-token distribution).
    compiled   (opt-in) the LM compiled (``torch.compile``, static shapes; CUDA graphs on a GPU): whole prefill and
               LM alone at keep-all and at the smallest keep, at batch 1.
Random weights make fidelity figures a sanity check only; timings on a shared CPU are noisy.
"""
from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import mmmerge
from mmmerge.adapters import llava

from .timing import machine, markdown_table, seconds

PROMPT_TEXT = 40  # text tokens around the image
SECTIONS = ("prefill", "reduction", "stage", "compiled")
DEFAULT_SECTIONS = ("prefill", "reduction", "stage")  # compiled: opt-in (building the graphs takes minutes on a CPU)
BATCHES = (1, 8)


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
    """``batch`` prompts of ``PROMPT_TEXT`` text tokens around one image each, for LLaVA-1.5 (576 tokens at 336 px)
    or LLaVA-NeXT (a square image of 2 x 2 tiles: base view + 4 crops, 2880 feature tokens and 48 newlines)."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, batch: int = 1) -> None:
        self.model = model
        self.batch = batch
        llava.restore_visual_tokens(model)  # the unreduced counts are measured below
        self.next = type(model).__name__.startswith("LlavaNext")
        vcfg = model.config.vision_config
        tile = vcfg.image_size
        self.pixels: Dict[str, torch.Tensor] = {}
        g = torch.Generator().manual_seed(1)
        if self.next:
            one = torch.randn(1, 5, 3, tile, tile, generator=g)
            self.pixels["pixel_values"] = one.expand(batch, -1, -1, -1, -1).to(device, dtype)
            self.pixels["image_sizes"] = torch.tensor([[2 * tile, 2 * tile]] * batch)  # host, as the processor
            with torch.no_grad():
                packed = model.model.get_image_features(one.to(device, dtype), self.pixels["image_sizes"][:1])
            self.newlines = 2 * (tile // vcfg.patch_size)
            self.placeholders = packed.pooler_output[0].shape[0]
            self.full = self.placeholders - self.newlines  # feature tokens (2880 at 336 px)
        else:
            one = torch.randn(1, 3, tile, tile, generator=g)
            self.pixels["pixel_values"] = one.expand(batch, -1, -1, -1).to(device, dtype)
            self.newlines = 0
            self.full = self.placeholders = (tile // vcfg.patch_size) ** 2
        image_id = model.config.image_token_id
        text = torch.randint(1, image_id - 1, (1, PROMPT_TEXT), generator=torch.Generator().manual_seed(0))
        self.full_ids = torch.cat([text[:, :5], torch.full((1, self.placeholders), image_id), text[:, 5:]], 1)
        self.full_ids = self.full_ids.expand(batch, -1).to(device)
        F_ = self.full
        self.keeps = [576, 192, 144, 64] if F_ == 576 else [2880, 640, 320, 160] if F_ == 2880 else \
            [F_, F_ * 2 // 9, F_ // 9, F_ // 18] if self.next else [F_, F_ // 3, F_ // 4, F_ // 9]

    def reduce(self, keep: int, method: str = "tome", where: str = "post_projector") -> None:
        """Reduce the model for ``keep`` (undoing any earlier reduction first)."""
        llava.restore_visual_tokens(self.model)
        llava.reduce_visual_tokens(self.model, keep=keep, method=method, where=where)

    def patch(self, keep: int, method: str = "tome", where: str = "post_projector") -> torch.Tensor:
        """Reduce for ``keep`` and return the compacted input ids ``[batch, tokens(keep)]``."""
        self.reduce(keep, method, where)
        sizes = self.pixels.get("image_sizes")
        ids, _ = llava.compact_image_tokens(self.full_ids, None, self.model, image_sizes=sizes)
        return ids

    def features(self):
        """The model's own image features of the workload's pixels (reduced when the model is)."""
        return self.model.model.get_image_features(**self.pixels)

    def tokens(self, keep: int) -> int:
        """Prefill tokens per prompt at ``keep``: text, kept visual tokens, newlines."""
        return PROMPT_TEXT + keep + self.newlines


@torch.no_grad()
def run(out_dir: Optional[Path] = None, quick: bool = False, size: Optional[str] = None,
        repeats: int = 3, threads: Optional[int] = 1, sections: Sequence[str] = DEFAULT_SECTIONS,
        progress=None, batches: Sequence[int] = BATCHES) -> List[Dict[str, object]]:
    """Rows (flat dicts) of the tables in ``sections`` (prefill, reduction, stage, compiled); ``table`` says which.

    ``threads``: torch CPU threads for the whole run (1 by default: a shared CPU; None leaves torch's choice).
    ``batches``: prompts per prefill call, one row set each (``quick``: batch 1 and 2).
    ``progress``: optional tqdm-like bar, advanced once per section.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batches):
        raise ValueError(f"batches must be positive ints, got {list(batches)}")
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
    batches = tuple(min(b, 2) for b in batches) if quick else tuple(batches)
    model = build(size, device, dtype)
    work = Workload(model, device, dtype)
    keeps = work.keeps
    rows: List[Dict[str, object]] = []
    info = dict(size=size, device=device.type, dtype=str(dtype).replace("torch.", ""))

    def done(section: str) -> None:
        if progress is not None:
            progress.set_postfix_str(section)
            progress.update(1)

    if "prefill" in sections:
        for batch in dict.fromkeys(batches):
            rows += _prefill_rows(Workload(model, device, dtype, batch), keeps, repeats, {**info, "batch": batch})
        done("prefill")
    if "reduction" in sections:
        rows += _reduction_rows(work, keeps, quick, repeats, {**info, "batch": 1})
        done("reduction")
    if "stage" in sections:
        rows += _stage_rows(work, keeps, quick, repeats, info)
        done("stage")
    if "compiled" in sections:
        rows += _compiled_rows(work, keeps, repeats, {**info, "batch": 1})
        done("compiled")
    llava.restore_visual_tokens(model)
    if out_dir is not None:
        import json
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"llava_{size}.json").write_text(json.dumps(rows, indent=1))
    return rows


def _prefill_fns(work: Workload, keeps: Sequence[int], tag: str = "") -> Dict[str, object]:
    """Timed callables: the whole prefill (re-reducing the model for its keep first, untimed) and the LM alone on
    embeddings of the same length (the LM's cost depends on the length only), per keep."""
    model = work.model
    fns: Dict[str, object] = {}
    for keep in keeps:
        ids = work.patch(keep)
        emb = model.model.get_input_embeddings()(ids)

        def whole(ids=ids):
            return model(input_ids=ids, **work.pixels, logits_to_keep=1)

        fns[f"whole{tag}_{keep}"] = (functools.partial(work.reduce, keep), whole)
        fns[f"lm{tag}_{keep}"] = lambda emb=emb: model(inputs_embeds=emb, logits_to_keep=1)
    return fns


def _prefill_row_values(work: Workload, t: Dict[str, float], keep: int, tag: str = "") -> Dict[str, object]:
    N = work.full
    ratio = work.tokens(N) / work.tokens(keep)
    whole, lm = t[f"whole{tag}_{keep}"], t[f"lm{tag}_{keep}"]
    return {"keep": keep, "prefill_tokens": work.tokens(keep), "token_ratio": ratio, "prefill_ms": whole * 1e3,
            "lm_ms": lm * 1e3, "tokens_per_s": work.batch * work.tokens(keep) / whole,
            "speedup": t[f"whole{tag}_{N}"] / whole, "lm_speedup": t[f"lm{tag}_{N}"] / lm,
            "lm_efficiency": (t[f"lm{tag}_{N}"] / lm) / ratio}


def _prefill_rows(work: Workload, keeps, repeats, info) -> List[Dict[str, object]]:
    """Whole prefill and LM alone, keep-all vs reduced, interleaved in one loop, at ``work.batch`` prompts."""
    t = _median(_prefill_fns(work, keeps), repeats)
    return [{"table": "prefill", **info, **_prefill_row_values(work, t, keep)} for keep in keeps]


def _compiled_rows(work: Workload, keeps, repeats, info) -> List[Dict[str, object]]:
    """The LM compiled with static shapes (``mode="reduce-overhead"``: CUDA graphs, on a GPU): a reduced prompt's
    length is fixed by keep, so each keep is one graph. Whole prefill and LM alone at keep-all and the smallest
    keep, eager and compiled interleaved."""
    model = work.model
    lm = model.model.language_model
    chosen = [keeps[0], keeps[-1]]
    eager = _prefill_fns(work, chosen)
    mode = "reduce-overhead" if torch.cuda.is_available() else "default"
    lm.__dict__["forward"] = torch.compile(lm.forward, dynamic=False, mode=mode)  # removed again below
    try:
        compiled = _prefill_fns(work, chosen, tag="_compiled")
        t = _median({**eager, **compiled}, repeats)
    finally:
        del lm.__dict__["forward"]
    rows = []
    for keep in chosen:
        for tag, mode_name in (("", "eager"), ("_compiled", f"compiled ({mode})")):
            rows.append({"table": "compiled", **info, "mode": mode_name, **_prefill_row_values(work, t, keep, tag)})
    return rows


def _reduction_rows(work: Workload, keeps, quick, repeats, info) -> List[Dict[str, object]]:
    """Cost of the reduction through the public entry point: the reduced ``get_image_features`` against the
    unreduced one on the same pixels (tower with the hidden states LLaVA asks for, projector, packing). Time
    (difference of medians), dispatched aten ops, and host time on the meta device (no kernels run)."""
    rows: List[Dict[str, object]] = []
    model = work.model
    methods = ("tome", "pitome", "tps", "dominant") if not quick else ("tome", "dominant")
    chosen = (keeps[3],) if quick else (keeps[2], keeps[3])
    setups = [(method, keep) for method in methods for keep in chosen]
    meta_model = build(str(info["size"]), torch.device("meta"), next(model.parameters()).dtype)
    meta = Workload(meta_model, torch.device("meta"), next(model.parameters()).dtype)

    def setup(load: Workload, method: Optional[str], keep: int = 0) -> None:
        """Patch ``load`` for (method, keep), or restore it, and make one untimed call: what a reduced model
        builds once per input shape (the anyres layouts and row budgets) is then built, as in steady use."""
        llava.restore_visual_tokens(load.model)
        if method is not None:
            load.reduce(keep, method)
        load.features()

    fns: Dict[str, object] = {"plain": (functools.partial(setup, work, None), work.features)}
    meta_fns: Dict[str, object] = {"plain": (functools.partial(setup, meta, None), meta.features)}
    ops: Dict[str, int] = {}
    setup(work, None)
    ops["plain"] = sum(mmmerge.count_ops(work.features).values())
    for method, keep in setups:
        name = f"{method}_{keep}"
        setup(work, method, keep)
        ops[name] = sum(mmmerge.count_ops(work.features).values())
        fns[name] = (functools.partial(setup, work, method, keep), work.features)
        meta_fns[name] = (functools.partial(setup, meta, method, keep), meta.features)
    t = _median(fns, repeats)
    host = _median(meta_fns, max(repeats, 3))
    for method, keep in setups:
        name = f"{method}_{keep}"
        rows.append({"table": "reduction", **info, "method": method, "keep": keep,
                     "reduce_ms": (t[name] - t["plain"]) * 1e3, "tower_ms": t["plain"] * 1e3,
                     "fraction_of_tower": (t[name] - t["plain"]) / t["plain"],
                     "reduce_ops": ops[name] - ops["plain"], "tower_ops": ops["plain"],
                     "host_ms_meta": (host[name] - host["plain"]) * 1e3, "tower_host_ms_meta": host["plain"] * 1e3,
                     "host_share": (host[name] - host["plain"]) / host["plain"]})
    llava.restore_visual_tokens(model)
    llava.restore_visual_tokens(meta_model)
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
    "prefill": ["batch", "keep", "prefill_tokens", "token_ratio", "prefill_ms", "speedup", "tokens_per_s", "lm_ms",
                "lm_speedup", "lm_efficiency"],
    "reduction": ["method", "keep", "reduce_ms", "tower_ms", "fraction_of_tower", "reduce_ops", "tower_ops",
                  "host_ms_meta", "tower_host_ms_meta", "host_share"],
    "compiled": ["mode", "keep", "prefill_tokens", "prefill_ms", "speedup", "lm_ms", "lm_speedup"],
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
    parser.add_argument("--sections", nargs="+", default=list(DEFAULT_SECTIONS), choices=SECTIONS,
                        help="tables to measure (default: prefill, reduction, stage; compiled is opt-in)")
    parser.add_argument("--batch", nargs="+", type=int, default=list(BATCHES),
                        help="prompts per prefill call, one row set each (default: 1 8; --quick caps them at 2)")
    args = parser.parse_args(argv)
    rows = run(args.out, quick=args.quick, size=args.size, repeats=args.repeats, threads=args.threads or None,
               sections=args.sections, batches=args.batch)
    print(f"machine: {machine()}; torch threads {torch.get_num_threads()}; one image per prompt, {PROMPT_TEXT} text "
          f"tokens, random weights, size={rows[0]['size']}, {rows[0]['dtype']}; median of {1 if args.quick else args.repeats} "
          "interleaved runs (a shared CPU is noisy)")
    for table in args.sections:
        chosen = [r for r in rows if r["table"] == table]
        if chosen:
            print(f"\n{table}\n" + markdown_table(chosen, COLUMNS[table]))


if __name__ == "__main__":
    main()
