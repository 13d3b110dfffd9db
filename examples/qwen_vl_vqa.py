r"""Ask a Qwen-VL model about an image (and a clip), with and without visual-token reduction.

    python examples/qwen_vl_vqa.py                          # offline: tiny random Qwen2.5-VL (see below)
    python examples/qwen_vl_vqa.py --tiny qwen3             # offline: tiny random Qwen3-VL (qwen2, qwen2.5, qwen3)
    python examples/qwen_vl_vqa.py --model Qwen/Qwen2.5-VL-7B-Instruct --image photo.jpg \
        --question "What is in the picture?" --keep 0.25 --method dominant

Prints the answer of the unmodified model and of the model whose language model sees fewer visual tokens, the
visual-token counts, and the prefill time of both, timed side by side (each round runs the full prefill and the
reduced one back to back; the speedup is the median of the per-round ratios). The reduced model keeps every
kept token at the M-RoPE position (time, row, col) the unreduced model gives it, and the text after the image
continues where it would have.

With no ``--model`` the script builds a tiny Qwen-VL from configs with RANDOM WEIGHTS and a made-up word vocabulary,
so it runs offline in seconds: its "answers" are meaningless token strings. It shows the mechanics (counts,
timing, the API) on an image and a short generated clip; use a real checkpoint for real answers.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import numpy as np
import torch

from mmmerge.adapters import qwen_vl
from mmmerge.adapters.qwen_vl.patch import METHODS

TINY = ("qwen2", "qwen2.5", "qwen3")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
             "<|vision_end|>"] + [f"word{i}" for i in range(248)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                         "vision_start_token": "<|vision_start|>",
                                                         "vision_end_token": "<|vision_end|>"}), len(words)


def tiny_model_and_processor(kind: str = "qwen2.5"):
    """A tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL (4 tower blocks on 8 px patches, 2x2 merge, 2 LM layers) and a
    matching processor (images up to 128 x 128 px: up to 64 visual tokens)."""
    import transformers as tf

    torch.manual_seed(0)
    tokenizer, vocab = _tokenizer()
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2)
    pixels = dict(min_pixels=32 * 32, max_pixels=128 * 128)
    rope = {"rope_type": "default", "mrope_section": [4, 2, 2]}
    text = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_scaling=rope)
    ids = dict(image_token_id=4, video_token_id=5, vision_start_token_id=6, vision_end_token_id=7)
    tower = dict(depth=4, num_heads=4, patch_size=8, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    images = tf.Qwen2VLImageProcessor(**sizes, **pixels)
    if kind == "qwen2":
        config = tf.Qwen2VLConfig(text_config=text, vision_config=dict(embed_dim=64, hidden_size=64, mlp_ratio=2,
                                                                         **tower), **ids)
        model = tf.Qwen2VLForConditionalGeneration(config)
        processor = tf.Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer,
                                        video_processor=tf.Qwen2VLVideoProcessor(**sizes, **pixels))
    elif kind == "qwen2.5":
        config = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            hidden_size=64, out_hidden_size=64, intermediate_size=128, window_size=32, fullatt_block_indexes=[3],
            **tower), **ids)
        model = tf.Qwen2_5_VLForConditionalGeneration(config)
        processor = tf.Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer,
                                           video_processor=tf.Qwen2VLVideoProcessor(**sizes, **pixels))
    else:
        rope = {**rope, "mrope_interleaved": True}
        config = tf.Qwen3VLConfig(text_config={**text, "rope_scaling": rope, "head_dim": 16}, vision_config=dict(
            hidden_size=64, out_hidden_size=64, intermediate_size=128, num_position_embeddings=256,
            deepstack_visual_indexes=[1], **tower), **ids)
        model = tf.Qwen3VLForConditionalGeneration(config)
        videos = tf.Qwen3VLVideoProcessor(**sizes, size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128 * 4})
        processor = tf.Qwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos)
    return model.eval(), processor


def load_image(path, size=(240, 320)):
    from PIL import Image

    if path is None:  # a synthetic picture: a red disc on a blue-green gradient
        yy, xx = np.mgrid[0:size[0], 0:size[1]]
        img = np.stack([(xx * 255 // size[1]), (yy * 255 // size[0]), np.full_like(xx, 128)], -1).astype(np.uint8)
        img[(yy - size[0] // 2) ** 2 + (xx - size[1] // 2) ** 2 < (size[0] // 4) ** 2] = (220, 30, 30)
        return Image.fromarray(img)
    return Image.open(path).convert("RGB")


def generated_clip(frames: int = 4, size: int = 64) -> np.ndarray:
    """``[frames, size, size, 3]`` uint8: a white square moving left to right on grey."""
    clip = np.full((frames, size, size, 3), 90, dtype=np.uint8)
    for f in range(frames):
        x = f * (size - 16) // max(frames - 1, 1)
        clip[f, 24:40, x:x + 16] = 255
    return clip


def make_prompt(processor, question: str, video: bool) -> str:
    content = [{"type": "image"}] + ([{"type": "video"}] if video else []) + [{"type": "text", "text": question}]
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    vision = "<|vision_start|> <|image_pad|> <|vision_end|>"
    if video:
        vision += " <|vision_start|> <|video_pad|> <|vision_end|>"
    return f"word10 {vision} word11 word12"


def encode(model, processor, image, clip, prompt: str):
    import transformers as tf

    extra = {}
    if clip is not None:
        extra["videos"] = [clip]
        if isinstance(processor, tf.Qwen3VLProcessor):
            extra["do_sample_frames"] = False
    inputs = processor(images=[image], text=[prompt], return_tensors="pt", **extra).to(model.device)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(model.dtype)
    inputs.pop("token_type_ids", None)
    return inputs


@torch.no_grad()
def prefill_seconds(model, inputs) -> float:
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    sync()
    gc.disable()
    try:
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        sync()
        return time.perf_counter() - start
    finally:
        gc.enable()


@torch.no_grad()
def answer(model, processor, inputs, max_new_tokens: int) -> str:
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()


def parse_keep(text: str):
    """``--keep``: "64" is a token count per image / video (>= 1), "0.25" a fraction in (0, 1]."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither a token count (64) nor a fraction (0.25)") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"{text}: a fraction must lie in (0, 1]")
        return value
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: a token count must be >= 1")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub name or local directory of a Qwen-VL checkpoint")
    parser.add_argument("--tiny", choices=TINY, default="qwen2.5",
                        help="without --model: which tiny random model to build")
    parser.add_argument("--image", default=None, help="image file (default: a synthetic picture)")
    parser.add_argument("--no-video", action="store_true", help="tiny models: leave out the generated clip")
    parser.add_argument("--question", default="What is shown in this image?")
    parser.add_argument("--keep", type=parse_keep, default=0.25, help="visual tokens per image / video, or a fraction")
    parser.add_argument("--method", default="tome", choices=METHODS)
    parser.add_argument("--time-mode", default=None, help="videos: global, within_frame, adjacent or window(k)")
    parser.add_argument("--max-new-tokens", type=positive, default=20)
    parser.add_argument("--repeats", type=positive, default=7, help="timed rounds (each: full, then reduced)")
    parser.add_argument("--threads", type=positive, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.image is not None and not os.path.isfile(args.image):
        parser.error(f"--image {args.image}: no such file")
    torch.set_num_threads(args.threads)

    if args.model is None:
        print(f"No --model given: using a TINY {args.tiny} VL model built from config with RANDOM WEIGHTS (offline "
              "demo; its answers are meaningless).")
        model, processor = tiny_model_and_processor(args.tiny)
        clip = None if args.no_video else generated_clip()
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        processor = AutoProcessor.from_pretrained(args.model)
        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=dtype).to(device).eval()
        clip = None
    prompt = make_prompt(processor, args.question, clip is not None)
    image = load_image(args.image)
    options = dict(keep=args.keep, method=args.method, time_mode=args.time_mode, processor=processor)
    try:  # a keep, method or time mode the model cannot take: one clear line, nothing changed
        qwen_vl.reduce_visual_tokens(model, **options)
    except (TypeError, ValueError) as err:
        parser.error(str(err))
    reduced_inputs = encode(model, processor, image, clip, prompt)
    qwen_vl.restore_visual_tokens(model, processor)
    full_inputs = encode(model, processor, image, clip, prompt)

    def use(reduced: bool):
        qwen_vl.restore_visual_tokens(model, processor)
        if reduced:
            qwen_vl.reduce_visual_tokens(model, **options)
        return reduced_inputs if reduced else full_inputs

    for reduced in (False, True):  # warm-up, both sides
        prefill_seconds(model, use(reduced))
    times = {False: [], True: []}
    for _ in range(args.repeats):
        for reduced in (False, True):
            inputs = use(reduced)
            times[reduced].append(prefill_seconds(model, inputs))
    ratios = [full / short for full, short in zip(times[False], times[True])]
    texts = {reduced: answer(model, processor, use(reduced), args.max_new_tokens) for reduced in (False, True)}
    qwen_vl.restore_visual_tokens(model, processor)

    config = model.config
    for reduced, name in ((False, "full"), (True, f"{args.method}, keep={args.keep}")):
        inputs = reduced_inputs if reduced else full_inputs
        ids = inputs["input_ids"]
        counts = f"image tokens {int((ids == config.image_token_id).sum())}"
        if clip is not None:
            counts += f", video tokens {int((ids == config.video_token_id).sum())}"
        print(f"\n[{name}] {counts}; prefill {ids.shape[1]} tokens in {statistics.median(times[reduced]) * 1e3:.1f} "
              f"ms (median)\n  answer: {texts[reduced]!r}")
    print(f"\nprefill speedup {statistics.median(ratios):.2f}x (median of {args.repeats} side-by-side pairs, range "
          f"{min(ratios):.2f}-{max(ratios):.2f}x, {torch.get_num_threads()} thread(s))")
    if args.model is None:
        print("(tiny model: its whole prefill takes milliseconds, so fixed costs can outweigh what the LM saves)")


if __name__ == "__main__":
    main()
