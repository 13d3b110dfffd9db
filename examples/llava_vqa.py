"""Ask a LLaVA model about an image, with and without visual-token reduction.

    python examples/llava_vqa.py                                   # offline: tiny random LLaVA-1.5 (see below)
    python examples/llava_vqa.py --tiny next                       # offline: tiny random LLaVA-NeXT (anyres)
    python examples/llava_vqa.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg \\
        --question "What is in the picture?" --keep 64 --method dominant
    python examples/llava_vqa.py --batch 8                         # 8 prompts per call (fewer tokens pay at batch)
    python examples/llava_vqa.py --compile                         # compiled LM, static-cache generate

Prints the answer of the unmodified model and of the model whose language model sees fewer visual tokens, the
visual-token counts, and the prefill time of both, timed side by side: each round runs the full prefill and the
reduced one back to back (the patch is switched between them, untimed), and the speedup shown is the median of
the per-round ratios, so a busy machine slows both sides of a pair alike. Works for LLaVA-1.5, LLaVA-NeXT and
LLaVA-OneVision checkpoints (anything ``AutoModelForImageTextToText`` loads that mmmerge supports).

``--batch B`` asks the question B times in one call (one image each). ``--compile``: a reduced prompt's length is
fixed by ``keep``, so the language model runs compiled with static shapes (``torch.compile``; CUDA graphs on a
GPU) and ``generate`` uses a static cache (``cache_implementation="static"``; transformers compiles its decoding
step itself on a GPU). The first calls of each length build the graphs (untimed warm-up).

With no ``--model`` the script builds a tiny LLaVA from configs with RANDOM WEIGHTS and a made-up word
vocabulary, so it runs offline in seconds: its "answers" are meaningless token strings. It only shows the
mechanics (counts, timing, the API); use a real checkpoint for real answers.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import numpy as np
import torch

from mmmerge.adapters import llava
from mmmerge.extras import model_folder_problem


def _tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def tiny_model_and_processor(kind: str = "llava"):
    """A tiny LLaVA-1.5 (CLIP 64x64 / patch 8 -> 64 visual tokens, 2-layer LLaMA) or LLaVA-NeXT (the same tower on
    64 px tiles, up to 2 x 2 crops) and a matching processor."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor, LlavaProcessor)

    torch.manual_seed(0)
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + [f"word{i}" for i in range(251)]
    tokenizer = _tokenizer(words)
    vision = CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=4, num_attention_heads=4)
    text = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=2)
    common = dict(vision_config=vision, text_config=text, image_token_id=4, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    if kind == "next":
        pinpoints = [[64, 128], [128, 64], [128, 128]]
        images = LlavaNextImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                         image_grid_pinpoints=pinpoints)
        processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                       vision_feature_select_strategy="default", num_additional_image_tokens=1)
        return LlavaNextForConditionalGeneration(LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)).eval(), \
            processor
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return LlavaForConditionalGeneration(LlavaConfig(**common)).eval(), processor


def load_image(path):
    from PIL import Image

    if path is None:  # a synthetic picture: a red disc on a blue-green gradient
        yy, xx = np.mgrid[0:240, 0:320]
        img = np.stack([(xx * 255 // 320), (yy * 255 // 240), np.full_like(xx, 128)], -1).astype(np.uint8)
        img[(yy - 120) ** 2 + (xx - 160) ** 2 < 60 ** 2] = (220, 30, 30)
        return Image.fromarray(img)
    return Image.open(path).convert("RGB")


def make_prompt(processor, question: str) -> str:
    if getattr(processor, "chat_template", None):
        chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(chat, add_generation_prompt=True)
    return f"USER: <image>\n{question} ASSISTANT:"


def encode(model, processor, image, prompt: str, batch: int = 1):
    """The processor's inputs for ``batch`` copies of one prompt about one image, on the model's device."""
    inputs = processor(images=[image] * batch, text=[prompt] * batch, return_tensors="pt", padding=True)
    inputs = inputs.to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


@torch.no_grad()
def prefill_seconds(model, inputs) -> float:
    """One prefill (tower, reduction, projector, LM over the prompt, last-token logits), synchronised."""
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    gc.disable()  # as timeit does: a garbage collection pass inside one call would dwarf a tiny model's prefill
    try:
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        sync()
        return time.perf_counter() - start
    finally:
        gc.enable()


def compile_language_model(model) -> None:
    """Run the language model compiled with static shapes (an instance ``forward``; ``uncompile`` removes it)."""
    lm = model.model.language_model
    mode = "reduce-overhead" if model.device.type == "cuda" else "default"  # CUDA graphs remove the host floor
    lm.__dict__["forward"] = torch.compile(lm.forward, dynamic=False, mode=mode)


def uncompile_language_model(model) -> None:
    model.model.language_model.__dict__.pop("forward", None)


@torch.no_grad()
def answer(model, processor, inputs, max_new_tokens: int, static_cache: bool = False) -> str:
    """The first prompt's answer (greedy); ``static_cache``: a static KV cache, as compiled decoding needs."""
    extra = {"cache_implementation": "static"} if static_cache else {}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def parse_keep(text: str):
    """``--keep``: "64" is a token count (>= 1), "0.25" or "1.0" a fraction of the visual tokens in (0, 1]."""
    try:
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text}: a token count must be >= 1")
        return value
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a token count (64) nor a fraction (0.25)") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text}: a fraction must lie in (0, 1]")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def check_image(parser: argparse.ArgumentParser, path) -> None:
    """One clear line for a missing, unreadable or damaged image, before any model loads."""
    if path is None:
        return
    if not os.path.isfile(path):
        parser.error(f"--image {path}: no such file")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError) as err:
        parser.error(f"--image {path}: not a readable image ({err})")


def check_model_folder(parser: argparse.ArgumentParser, name) -> None:
    """A ``--model`` that names a path must be a model folder (hub ids such as ``org/name`` go to transformers)."""
    problem = model_folder_problem(name)
    if problem:
        parser.error(problem)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub name or local directory of a LLaVA checkpoint")
    parser.add_argument("--tiny", choices=("llava", "next"), default="llava",
                        help="without --model: which tiny random model to build (LLaVA-1.5 or LLaVA-NeXT)")
    parser.add_argument("--image", default=None, help="image file (default: a synthetic picture)")
    parser.add_argument("--question", default="What is shown in this image?")
    parser.add_argument("--keep", type=parse_keep, default=None,
                        help="visual tokens per image (int) or a fraction; default 144, or 0.25 for the tiny models")
    parser.add_argument("--method", default="tome", choices=llava.METHODS)
    parser.add_argument("--where", default="post_projector", choices=llava.WHERE)
    parser.add_argument("--max-new-tokens", type=positive, default=20)
    parser.add_argument("--repeats", type=positive, default=7, help="timed rounds (each: full, then reduced)")
    parser.add_argument("--batch", type=positive, default=1, help="prompts per call (the question B times)")
    parser.add_argument("--compile", action="store_true",
                        help="compiled language model (static shapes) and static-cache generate")
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch CPU threads (default 1: on a shared CPU one thread gives the steadiest ratio)")
    args = parser.parse_args(argv)
    check_image(parser, args.image)
    check_model_folder(parser, args.model)
    torch.set_num_threads(args.threads)

    if args.model is None:
        print(f"No --model given: using a TINY {'LLaVA-NeXT' if args.tiny == 'next' else 'LLaVA'} built from config "
              "with RANDOM WEIGHTS (offline demo; its answers are meaningless).")
        model, processor = tiny_model_and_processor(args.tiny)
        prompt = "word1 word2 <image> word3 word4"
        keep = 0.25 if args.keep is None else args.keep
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        processor = AutoProcessor.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device).eval()
        prompt = make_prompt(processor, args.question)
        keep = 144 if args.keep is None else args.keep
    image = load_image(args.image)
    try:  # a keep or method the model cannot take: one clear line, nothing changed
        llava.reduce_visual_tokens(model, keep=keep, method=args.method, where=args.where, processor=processor)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    reduced_inputs = encode(model, processor, image, prompt, args.batch)
    llava.restore_visual_tokens(model, processor)
    full_inputs = encode(model, processor, image, prompt, args.batch)
    if args.compile:
        compile_language_model(model)

    def use(reduced: bool):
        llava.restore_visual_tokens(model, processor)
        if reduced:
            llava.reduce_visual_tokens(model, keep=keep, method=args.method, where=args.where, processor=processor)
        return reduced_inputs if reduced else full_inputs

    for reduced in (False, True):  # warm-up, both sides
        prefill_seconds(model, use(reduced))
    times = {False: [], True: []}
    for _ in range(args.repeats):  # interleaved: one full prefill, then one reduced, per round
        for reduced in (False, True):
            inputs = use(reduced)  # switching the patch is host-side work, outside the timed call
            times[reduced].append(prefill_seconds(model, inputs))
    ratios = [full / short for full, short in zip(times[False], times[True])]
    texts = {reduced: answer(model, processor, use(reduced), args.max_new_tokens, static_cache=args.compile)
             for reduced in (False, True)}
    llava.restore_visual_tokens(model, processor)
    uncompile_language_model(model)

    image_id = model.config.image_token_id
    for reduced, name in ((False, "full"), (True, f"{args.method}, keep={keep}, where={args.where}")):
        inputs = reduced_inputs if reduced else full_inputs
        visual = int((inputs["input_ids"][0] == image_id).sum())
        tokens = inputs["input_ids"].shape[1]
        prefill = statistics.median(times[reduced])
        print(f"\n[{name}{', compiled' if args.compile else ''}] visual tokens {visual} per prompt, prefill "
              f"{args.batch} x {tokens} tokens in {prefill * 1e3:.1f} ms (median)\n"
              f"  answer: {texts[reduced]!r}")
    visual = [int((i["input_ids"][0] == image_id).sum()) for i in (full_inputs, reduced_inputs)]
    print(f"\nprefill speedup {statistics.median(ratios):.2f}x (median of {args.repeats} side-by-side pairs, range "
          f"{min(ratios):.2f}-{max(ratios):.2f}x, {torch.get_num_threads()} thread(s)) with {visual[1]}/{visual[0]} "
          "visual tokens")
    if args.model is None:
        print("(tiny model: its whole prefill takes milliseconds, so the fixed cost of the reduction can outweigh "
              "what the LM saves; python -m benchmarks.llava measures a real-size tower)")


if __name__ == "__main__":
    main()
