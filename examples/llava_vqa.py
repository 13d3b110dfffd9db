"""Ask a LLaVA model about an image, with and without visual-token reduction.

    python examples/llava_vqa.py                                   # offline: tiny random model (see below)
    python examples/llava_vqa.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg \
        --question "What is in the picture?" --keep 64 --method dominant

Prints the answer of the unmodified model and of the model whose language model sees only ``--keep``
visual tokens per image, the visual-token counts, the prefill time (median of ``--repeats``) and tokens/s.

With no ``--model`` the script builds a tiny LLaVA from configs with RANDOM WEIGHTS and a made-up word
vocabulary, so it runs offline in seconds: its "answers" are meaningless token strings. It only shows the
mechanics (counts, timing, the API); use a real checkpoint for real answers.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from mmmerge.adapters import llava


def tiny_model_and_processor():
    """A tiny LLaVA (CLIP 64x64 / patch 8 -> 64 visual tokens, 2-layer LLaMA) and a matching processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    torch.manual_seed(0)
    words = ["<pad>", "<s>", "</s>", "<unk>", "<image>"] + [f"word{i}" for i in range(251)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=4, num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, pad_token_id=0, eos_token_id=2),
        image_token_id=4, vision_feature_layer=-2, vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config).eval(), processor


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


@torch.no_grad()
def answer(model, processor, image, prompt: str, max_new_tokens: int, repeats: int = 5):
    """(answer text, visual tokens the LM sees, prefill seconds (median of ``repeats``), prefill tokens)."""
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(model.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    model(**inputs, logits_to_keep=1)  # warm-up
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    times = []
    for _ in range(max(1, repeats)):
        sync()
        start = time.perf_counter()
        model(**inputs, logits_to_keep=1)  # the prefill: tower, reduction, projector, LM over the prompt
        sync()
        times.append(time.perf_counter() - start)
    prefill = statistics.median(times)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    text = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    return text.strip(), visual, prefill, inputs["input_ids"].shape[1]


def parse_keep(text: str):
    """``--keep``: "64" is a token count, "0.25" or "1.0" a fraction of the visual tokens."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub name or local directory of a LLaVA checkpoint")
    parser.add_argument("--image", default=None, help="image file (default: a synthetic picture)")
    parser.add_argument("--question", default="What is shown in this image?")
    parser.add_argument("--keep", type=parse_keep, default=None,
                        help="visual tokens per image (int) or a fraction; default 144, or 16 for the tiny model")
    parser.add_argument("--method", default="tome", choices=llava.METHODS)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="prefill timings per setting (the median is shown)")
    args = parser.parse_args(argv)

    if args.model is None:
        print("No --model given: using a TINY LLaVA built from config with RANDOM WEIGHTS (offline demo; "
              "its answers are meaningless).")
        model, processor = tiny_model_and_processor()
        prompt = "word1 word2 <image> word3 word4"
        keep = 16 if args.keep is None else args.keep
    else:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        processor = AutoProcessor.from_pretrained(args.model)
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
        prompt = make_prompt(processor, args.question)
        keep = 144 if args.keep is None else args.keep
    image = load_image(args.image)

    rows = [("full", *answer(model, processor, image, prompt, args.max_new_tokens, args.repeats))]
    llava.reduce_visual_tokens(model, keep=keep, method=args.method, processor=processor)
    rows.append((f"{args.method}, keep={keep}",
                 *answer(model, processor, image, prompt, args.max_new_tokens, args.repeats)))
    llava.restore_visual_tokens(model, processor)

    for name, text, visual, prefill, tokens in rows:
        print(f"\n[{name}] visual tokens {visual}, prefill {tokens} tokens in {prefill * 1e3:.1f} ms "
              f"({tokens / prefill:.0f} tokens/s)\n  answer: {text!r}")
    print(f"\nprefill speedup {rows[0][3] / rows[1][3]:.2f}x with {rows[1][2]}/{rows[0][2]} visual tokens")
    if args.model is None:
        print("(tiny model: its whole prefill takes milliseconds, so the fixed cost of the reduction can outweigh "
              "what the LM saves; python -m benchmarks.llava measures a real-size tower)")


if __name__ == "__main__":
    main()
