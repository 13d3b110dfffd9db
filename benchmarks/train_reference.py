"""Train the small reference models of the quality benchmark from scratch on CPU, deterministically.

    python -m benchmarks.train_reference --all            # rebuild all three (about 25 min on one CPU core)
    python -m benchmarks.train_reference videomae         # one of: vivit, videomae, ast
    python -m benchmarks.train_reference --all --steps 20 --out /tmp/ref   # quick reproducibility check

Each model is a real transformers class (VivitForVideoClassification, VideoMAEForVideoClassification,
ASTForAudioClassification) with a few narrow layers and its own tokenisation, trained on the seeded
tasks of ``benchmarks.tasks``. Everything is fixed: seeds, thread count (1), deterministic algorithms,
a pre-generated training pool, step count (never wall time), so the saved weights are bit for bit
the same on the same software and CPU type. Saved as ``benchmarks/reference/<name>/`` with
``model.safetensors``, ``config.json`` and ``training.json`` (steps, seed, held-out accuracy, hash).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import tasks

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
THREADS = 1  # more threads on a shared CPU are much slower (OpenMP oversubscription), and less reproducible
TEST_SEED = 1_000_000  # held-out clips come from seeds far from the training pool's


@dataclass
class Recipe:
    """How one reference model is built and trained."""

    name: str
    make_config: Callable[[], object]
    model_class: str
    batch: Callable[[int, int], Tuple[Tensor, Tensor]]  # (n, seed) -> inputs, labels
    input_key: str
    steps: int = 1000
    batch_size: int = 32
    pool: int = 8192
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    seed: int = 0
    # Weight of an auxiliary loss: the model's own classifier applied to the mean of the patch tokens
    # (deep supervision for CLS-pooled models; the saved model is the plain class with its own head).
    aux_mean_pool: float = 0.0
    lr_schedule: str = "cosine"  # "cosine": warmup then cosine decay to 0; "constant": warmup then flat
    task: str = "video"  # which FACTORS the held-out report splits the label into ("video", "audio", "when")
    init: Optional[str] = None  # start from this saved reference model (fine-tuning) instead of fresh weights


def _labels(names: List[str]) -> Dict[str, Dict]:
    """id2label and label2id for a config (the pipelines and the video example show the names)."""
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def _vivit_config():
    from transformers import VivitConfig

    # 8 frames x 32 x 32, tubelets 2 x 4 x 4: 4 x 8 x 8 = 256 tokens + CLS.
    config = VivitConfig(image_size=tasks.VIDEO_SIZE, num_frames=tasks.VIDEO_FRAMES, tubelet_size=[2, 4, 4],
                         hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                         num_labels=tasks.VIDEO_CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         **_labels(tasks.VIDEO_LABELS))
    return config


def _videomae_config():
    from transformers import VideoMAEConfig

    # 8 frames x 32 x 32, tubelet 2, patch 4: 4 x 8 x 8 = 256 tokens, mean pooling.
    return VideoMAEConfig(image_size=tasks.VIDEO_SIZE, num_frames=tasks.VIDEO_FRAMES, tubelet_size=2, patch_size=4,
                          hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                          num_labels=tasks.VIDEO_CLASSES, use_mean_pooling=True, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, **_labels(tasks.VIDEO_LABELS))


def _videomae_when_config():
    from transformers import VideoMAEConfig

    # The VideoMAE reference's shape (4 x 8 x 8 = 256 tokens, mean pooling) on the which-came-first task.
    return VideoMAEConfig(image_size=tasks.VIDEO_SIZE, num_frames=tasks.VIDEO_FRAMES, tubelet_size=2, patch_size=4,
                          hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                          num_labels=tasks.WHEN_CLASSES, use_mean_pooling=True, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, **_labels(tasks.WHEN_LABELS))


def _ast_config():
    from transformers import ASTConfig

    # 256 frames x 128 mel bins, 16 x 16 patches, strides 16 (frequency) and 8 (time): 8 bands x 31 columns
    # = 248 tokens + CLS + distillation.
    return ASTConfig(num_mel_bins=tasks.MEL_BINS, max_length=tasks.AUDIO_FRAMES, patch_size=16, frequency_stride=16,
                     time_stride=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                     num_labels=tasks.AUDIO_CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     **_labels(tasks.AUDIO_LABELS))


RECIPES: Dict[str, Recipe] = {
    "vivit": Recipe("vivit", _vivit_config, "VivitForVideoClassification", tasks.video_batch, "pixel_values",
                    steps=800, aux_mean_pool=1.0, lr_schedule="constant"),
    "videomae": Recipe("videomae", _videomae_config, "VideoMAEForVideoClassification", tasks.video_batch,
                       "pixel_values", steps=800),
    "ast": Recipe("ast", _ast_config, "ASTForAudioClassification", tasks.audio_batch, "input_values",
                  steps=1200, pool=6144, aux_mean_pool=1.0, task="audio"),
    # The reference AST fine-tuned on half unpadded, half padded clips (``tasks.padded_audio_batch``), as AudioSet's
    # ASTs see padding in training: the padding benchmark's second model (``python -m benchmarks padding``). (From
    # scratch with the "ast" recipe on these clips it stayed at chance: 14.8% held out after 1200 steps.)
    "ast_padded": Recipe("ast_padded", _ast_config, "ASTForAudioClassification", tasks.padded_audio_batch,
                         "input_values", steps=400, pool=6144, lr=5e-4, aux_mean_pool=1.0, task="audio", init="ast"),
    "videomae_when": Recipe("videomae_when", _videomae_when_config, "VideoMAEForVideoClassification",
                            tasks.when_batch, "pixel_values", steps=800, task="when"),
}


def setup_determinism(threads: int = THREADS) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    # Deterministic mode also fills every new tensor with NaN by default: 2-3x slower here and not needed.
    torch.utils.deterministic.fill_uninitialized_memory = False


def build_model(recipe: Recipe, seed: Optional[int] = None):
    import transformers

    torch.manual_seed(recipe.seed if seed is None else seed)
    config = recipe.make_config()
    config._attn_implementation = "sdpa"
    model = getattr(transformers, recipe.model_class)(config)
    if recipe.name in ("ast", "ast_padded", "vivit"):
        # transformers starts AST's and ViViT's CLS (and distillation) tokens and learned position embeddings
        # at zero (they are meant to be loaded from a checkpoint). From scratch that leaves every token
        # position-blind. So the special tokens are drawn like ViT's and the patch positions start from the
        # sinusoid table VideoMAE uses (then learned as usual). That alone was not enough: both still sat at
        # chance on the order factors until the auxiliary mean-pool loss (Recipe.aux_mean_pool) was added,
        # and ViViT learned the flash order only with a constant learning rate (in 800 steps).
        from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

        if recipe.name.startswith("ast"):
            emb = model.audio_spectrogram_transformer.embeddings
            special = (emb.cls_token, emb.distillation_token)
        else:
            emb = model.vivit.embeddings
            special = (emb.cls_token,)
        n_special = len(special)
        with torch.no_grad():
            for p in special:
                torch.nn.init.trunc_normal_(p, std=0.02)
            torch.nn.init.trunc_normal_(emb.position_embeddings[:, :n_special], std=0.02)
            n_patches = emb.position_embeddings.shape[1] - n_special
            emb.position_embeddings[:, n_special:] = get_sinusoid_encoding_table(n_patches, config.hidden_size)
    return model


def load_reference(name: str, directory: Optional[Path] = None):
    """The saved reference model ``name`` (eval mode, sdpa attention)."""
    import transformers
    from safetensors.torch import load_file

    recipe = RECIPES[name] if name in RECIPES else LLAVA_RECIPES[name]
    folder = Path(directory or REFERENCE_DIR) / name
    config_cls = type(recipe.make_config())
    config = config_cls.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    model = getattr(transformers, recipe.model_class)(config)
    weights = load_file(str(folder / "model.safetensors"))
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in weights:
        model.load_state_dict(weights, strict=False)  # the LM head is tied to the input embedding
        model.tie_weights()
        missing = set(model.state_dict()) - set(weights) - {"lm_head.weight"}
        if missing:
            raise ValueError(f"{folder / 'model.safetensors'} lacks {sorted(missing)[:3]}...: retrain with "
                             f"python -m benchmarks.train_reference {name}")
    else:
        model.load_state_dict(weights)
    return model.eval()


def test_set(name: str, n: int = 1024) -> Tuple[Tensor, Tensor]:
    """Held-out clips and labels of ``name``'s task (the same ones the training report uses)."""
    return RECIPES[name].batch(n, TEST_SEED)


def make_pool(recipe: Recipe, n: int, chunk: int = 512) -> Tuple[Tensor, Tensor]:
    """The training clips: ``n`` from seeds seed*1000 + chunk index, stored as float16 to save memory."""
    xs, ys = [], []
    for i in range(math.ceil(n / chunk)):
        x, y = recipe.batch(min(chunk, n - i * chunk), recipe.seed * 1000 + i)
        xs.append(x.half())
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def predict(model, x: Tensor, key: str, batch: int = 128) -> Tensor:
    model.eval()
    return torch.cat([model(**{key: x[i:i + batch].float()}).logits.argmax(-1) for i in range(0, len(x), batch)])


def accuracy(model, x: Tensor, y: Tensor, key: str, batch: int = 128) -> float:
    return float((predict(model, x, key, batch) == y).float().mean())


# The factors each task's label is made of: name -> (divisor, modulus) of the class index.
FACTORS = {"video": {"direction": (2, 4), "order": (1, 2)},
           "audio": {"order": (4, 2), "sweep": (2, 2), "gap": (1, 2)},
           "when": {"top/bottom": (2, 2)}}


def factor_accuracy(name: str, pred: Tensor, y: Tensor) -> Dict[str, float]:
    """Accuracy of each factor of the label alone (e.g. video: direction and flash order)."""
    factors = FACTORS[RECIPES[name].task]
    return {f: float(((pred // d) % m == (y // d) % m).float().mean()) for f, (d, m) in factors.items()}


def logits_and_mean_pool(model, x: Tensor) -> Tuple[Tensor, Tensor]:
    """The model's logits ``[B, L]`` (what ``model(x).logits`` gives) and its classifier applied to the mean of
    the patch tokens ``[B, L]`` (VideoMAE already pools that way, so there both are the same)."""
    name = type(model).__name__
    if name.startswith("AST"):
        out = model.audio_spectrogram_transformer(input_values=x)
        return model.classifier(out.pooler_output), model.classifier(out.last_hidden_state[:, 2:].mean(1))
    if name.startswith("Vivit"):
        hidden = model.vivit(pixel_values=x).last_hidden_state
        return model.classifier(hidden[:, 0]), model.classifier(hidden[:, 1:].mean(1))
    logits = model(pixel_values=x).logits
    return logits, logits


def state_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _optimizer_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, loss: torch.Tensor) -> float:
    """One training step of every recipe: backward, clip the gradient norm to 1, step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


def _log_progress(name: str, step: int, steps: int, losses: List[float], log_every: int, start: float) -> None:
    if log_every and (step + 1) % log_every == 0:
        recent = sum(losses[-log_every:]) / log_every
        print(f"[{name}] step {step + 1}/{steps} loss {recent:.3f} ({time.time() - start:.0f} s)", flush=True)


def train(recipe: Recipe, out_dir: Path, steps: Optional[int] = None, pool: Optional[int] = None,
          log_every: int = 50, eval_clips: int = 1024) -> Dict[str, object]:
    """Train ``recipe`` and save it to ``out_dir / recipe.name``; returns the training record."""
    setup_determinism()
    steps = recipe.steps if steps is None else steps
    start = time.time()
    x_pool, y_pool = make_pool(recipe, recipe.pool if pool is None else pool)
    x_test, y_test = test_set(recipe.name, eval_clips)
    data_s = time.time() - start
    model = build_model(recipe)
    if recipe.init is not None:  # fine-tune a saved reference model
        model.load_state_dict(load_reference(recipe.init).state_dict())
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embeddings" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), fused=True)
    warmup = max(1, steps // 20)
    if recipe.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown lr_schedule '{recipe.lr_schedule}'; use 'cosine' or 'constant'")

    def lr_factor(s: int) -> float:
        if recipe.lr_schedule == "constant":
            return min(1.0, (s + 1) / warmup)
        return min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    order = torch.Generator().manual_seed(recipe.seed + 17)
    perm = torch.randperm(len(x_pool), generator=order)
    cursor = 0
    losses: List[float] = []
    for step in range(steps):
        if cursor + recipe.batch_size > len(perm):
            perm, cursor = torch.randperm(len(x_pool), generator=order), 0
        idx = perm[cursor:cursor + recipe.batch_size]
        cursor += recipe.batch_size
        logits, pooled = logits_and_mean_pool(model, x_pool[idx].float())
        loss = torch.nn.functional.cross_entropy(logits, y_pool[idx])
        if recipe.aux_mean_pool:
            loss = loss + recipe.aux_mean_pool * torch.nn.functional.cross_entropy(pooled, y_pool[idx])
        losses.append(_optimizer_step(model, opt, sched, loss))
        _log_progress(recipe.name, step, steps, losses, log_every, start)
    train_s = time.time() - start - data_s
    pred = predict(model, x_test, recipe.input_key)
    acc = float((pred == y_test).float().mean())
    factors = factor_accuracy(recipe.name, pred, y_test)
    train_acc = accuracy(model, x_pool[:eval_clips], y_pool[:eval_clips], recipe.input_key)
    folder = Path(out_dir) / recipe.name
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    record = {"name": recipe.name, "class": recipe.model_class, "steps": steps, "batch_size": recipe.batch_size,
              "pool": len(x_pool), "seed": recipe.seed, "threads": THREADS, "lr": recipe.lr,
              "lr_schedule": recipe.lr_schedule, "aux_mean_pool": recipe.aux_mean_pool, "init": recipe.init,
              "parameters": sum(p.numel() for p in model.parameters()),
              "held_out_accuracy": acc, "held_out_factor_accuracy": factors, "held_out_clips": len(x_test), "train_accuracy": train_acc,
              "chance": 1.0 / model.config.num_labels, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
              "data_seconds": round(data_s, 1), "train_seconds": round(train_s, 1),
              "size_bytes": (folder / "model.safetensors").stat().st_size, "sha256_16": state_hash(model),
              "torch": torch.__version__, "command": f"python -m benchmarks.train_reference {recipe.name}"}
    import transformers

    record["transformers"] = transformers.__version__
    (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)
    return record


# ------------------------------------------------------------------------------------------ reference LLaVA
@dataclass
class LlavaRecipe:
    """How the reference LLaVA is built and trained (the visual questions of ``tasks.vqa_*``).

    A plain ``LlavaForConditionalGeneration``: a CLIP vision tower (48 x 48 px, 4 px patches: 144 visual tokens
    + [CLS]), LLaVA's two-layer MLP projector and a Llama LM with a word-level vocabulary
    (``tasks.VQA_VOCAB``), all from configs and trained from scratch. Prompt: ``<s>``, 144 ``<image>``, then
    the three question words; the answer is the next token after the last word.
    Training choices, each needed for the small model to learn in minutes (and why):
    - The CLIP position embeddings start from a 2-D sine table (rows in one half of the channels, columns in
      the other), then are learned: from the default random start the questions about a named cell stayed
      at chance.
    - ``align``: LLaVA's stage-1 feature alignment at the token level: each projected visual token is trained
      to name its cell (colour or "none", row word, column word) through the LM's own output embedding,
      which is tied to the input embedding. Projected tokens and word embeddings share one space, as in LLaVA
      after its alignment stage (this is also what makes CDPruner's text relevance meaningful here).
    - ``turns``: every training image comes with a dialogue of ``turns`` questions, each answered before the
      next is asked (as in LLaVA's multi-turn instruction data): ``turns`` supervised answers per image for
      little more compute (the image's tokens are most of the sequence). Single questions stayed near chance
      in the same time. Held-out questions are asked one per image.
    - ``text_heads``, ``rope_theta``: two heads of 32 channels and a large RoPE base, so that most channels of a
      head rotate slowly over the ~150 positions and a question word can find a visual token by content
      wherever it sits (with 4 heads of 16 channels and base 10^4 few channels are left for that).
    - ``shuffle``: the visual tokens reach the LM in a random order during training (the LM's positions say
      nothing about where a token came from), so the model reads a token's place from its content, as
      from the position embedding it carries. A reduced token set shifts every later sequence position;
      a model that had learned raster positions would fail after any reduction, whichever tokens are kept.
    """

    name: str = "llava"
    model_class: str = "LlavaForConditionalGeneration"
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    align: float = 1.0
    shuffle: bool = True
    turns: int = 16
    vision_layers: int = 2
    text_layers: int = 2
    text_heads: int = 2
    rope_theta: float = 1e6
    width: int = 64
    lr_schedule: str = "cosine"
    task: str = "vqa"

    def make_config(self):
        return _llava_config(self)


def _llava_config(recipe: "LlavaRecipe"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=tasks.VQA_SIZE, patch_size=tasks.VQA_CELL, hidden_size=recipe.width,
                              intermediate_size=4 * recipe.width, num_hidden_layers=recipe.vision_layers,
                              num_attention_heads=4, projection_dim=recipe.width)
    text = LlamaConfig(vocab_size=64, hidden_size=recipe.width, intermediate_size=3 * recipe.width,
                       num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
                       num_key_value_heads=recipe.text_heads, rope_theta=recipe.rope_theta,
                       max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tasks.VQA_PAD,
                       bos_token_id=tasks.VQA_BOS, eos_token_id=None)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tasks.VQA_IMAGE_TOKEN,
                       vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       image_seq_length=tasks.VQA_GRID ** 2, tie_word_embeddings=True)


def sincos_2d(grid: int, dim: int) -> Tensor:
    """``[grid * grid, dim]`` float32: sine/cosine of the row in the first half of the channels, of the
    column in the second (MAE's 2-D table), raster order."""
    def table(pos: Tensor, d: int) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        angle = pos.double().unsqueeze(1) * omega.unsqueeze(0)
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    return torch.cat([table(rows, dim // 2), table(cols, dim // 2)], dim=1).float()


def build_llava(recipe: "LlavaRecipe", seed: Optional[int] = None):
    import transformers

    torch.manual_seed(recipe.seed if seed is None else seed)
    config = recipe.make_config()
    config._attn_implementation = "sdpa"
    model = getattr(transformers, recipe.model_class)(config)
    emb = model.model.vision_tower.embeddings.position_embedding  # [1 + 144, C]: [CLS] first, then raster
    with torch.no_grad():
        emb.weight[1:] = sincos_2d(tasks.VQA_GRID, config.vision_config.hidden_size)
    return model


def vqa_dialogue(questions: Sequence[Tensor], answers: Sequence[Tensor],
                 image_tokens: int = tasks.VQA_GRID ** 2) -> Tuple[Tensor, List[int]]:
    """A multi-turn prompt: ``<s>``, the image placeholders, then for each turn the question words followed
    by the answer (the last turn's answer left out, it is what is predicted). Returns ``input_ids`` ``[B, L]``
    and the positions whose next token is each turn's answer (the last word of each question)."""
    parts = [tasks.vqa_input_ids(questions[0], image_tokens)]
    readout = [parts[0].shape[1] - 1]
    for prev, q in zip(answers[:-1], questions[1:]):
        parts += [prev.unsqueeze(1), q]
        readout.append(readout[-1] + 1 + q.shape[1])
    return torch.cat(parts, dim=1), readout


def vqa_logits(model, pixels: Tensor, input_ids: Tensor, readout: Sequence[int],
               order: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Answer logits ``[B, turns, V]`` at the ``readout`` positions (what ``model(input_ids, pixel_values)``
    gives there) and the projected visual tokens ``[B, N, C]``. ``order`` ``[B, N]`` hands the visual tokens to
    the LM permuted (training only). The placeholders must sit right after ``<s>``, as ``vqa_dialogue`` makes."""
    inner = model.model
    tokens = torch.stack(list(inner.get_image_features(pixel_values=pixels, return_dict=True).pooler_output))
    shown = tokens if order is None else tokens.gather(1, order.unsqueeze(-1).expand_as(tokens))
    n = tokens.shape[1]
    embeds = inner.get_input_embeddings()(input_ids)
    embeds = torch.cat([embeds[:, :1], shown.to(embeds.dtype), embeds[:, 1 + n:]], dim=1)
    hidden = inner.language_model(inputs_embeds=embeds).last_hidden_state[:, list(readout)]
    return model.lm_head(hidden), tokens


# Word groups each projected visual token is aligned with (``LlavaRecipe.align``).
_ALIGN_WORDS = {
    "colour": [tasks.VQA_TOKEN[c] for c in tasks.VQA_COLOURS] + [tasks.VQA_TOKEN["none"]],
    "row": [tasks.VQA_TOKEN[f"row{i}"] for i in range(tasks.VQA_GRID)],
    "col": [tasks.VQA_TOKEN[f"col{i}"] for i in range(tasks.VQA_GRID)],
}


def alignment_loss(model, tokens: Tensor, cells: Tensor) -> Tensor:
    """Mean over word groups of the cross-entropy of naming each visual token's cell through the LM head."""
    logits = model.lm_head(tokens)  # [B, 144, V]
    n_cells = cells.shape[1]
    pos = torch.arange(n_cells)
    targets = {"colour": torch.where(cells >= 0, cells, len(tasks.VQA_COLOURS)),
               "row": (pos // tasks.VQA_GRID).expand_as(cells), "col": (pos % tasks.VQA_GRID).expand_as(cells)}
    losses = [torch.nn.functional.cross_entropy(logits[..., words].flatten(0, 1), targets[group].flatten())
              for group, words in _ALIGN_WORDS.items()]
    return sum(losses) / len(losses)


def vqa_test_set(n: int = 1024) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Held-out images, questions, answers and question kinds (seed ``TEST_SEED``)."""
    p = tasks.vqa_params(n, TEST_SEED)
    return tasks.render_vqa(p), tasks.vqa_questions(p), tasks.vqa_answers(p), p["kind"]


@torch.no_grad()
def vqa_predict(model, pixels: Tensor, questions: Tensor, batch: int = 128) -> Tensor:
    model.eval()
    out = []
    for i in range(0, len(pixels), batch):
        ids, readout = vqa_dialogue([questions[i:i + batch]], [])
        out.append(vqa_logits(model, pixels[i:i + batch], ids, readout)[0][:, -1].argmax(-1))
    return torch.cat(out)


def vqa_report(pred: Tensor, answers: Tensor, kinds: Tensor) -> Dict[str, object]:
    """Accuracy overall and per question kind, and the chance level of each kind (uniform over its answers)."""
    ok = (pred == answers).float()
    per_kind = {k: float(ok[kinds == i].mean()) for i, k in enumerate(tasks.VQA_KINDS)}
    chance = {"colour": 1 / len(tasks.VQA_COLOURS), "count": 1 / (tasks.VQA_MAX_COUNT + 1), "left": 0.5}
    return {"accuracy": float(ok.mean()), "per_kind": per_kind,
            "chance": sum(chance[k] * float((kinds == i).float().mean()) for i, k in enumerate(tasks.VQA_KINDS)),
            "chance_per_kind": chance}


def train_llava(recipe: "LlavaRecipe", out_dir: Path, steps: Optional[int] = None, log_every: int = 100,
                eval_questions: int = 1024) -> Dict[str, object]:
    """Train the reference LLaVA and save it to ``out_dir / recipe.name``; returns the training record.

    Every step draws a fresh batch from seed ``seed * 10**6 + step`` (the held-out set uses ``TEST_SEED``) and
    its token order from one seeded generator, so the run is a pure function of the recipe."""
    setup_determinism()
    steps = recipe.steps if steps is None else steps
    start = time.time()
    x_test, q_test, a_test, k_test = vqa_test_set(eval_questions)
    model = build_llava(recipe)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98), fused=True)
    warmup = max(1, steps // 20)
    if recipe.lr_schedule != "cosine":
        raise ValueError(f"unknown lr_schedule '{recipe.lr_schedule}' for the LLaVA recipe; use 'cosine'")
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    order_gen = torch.Generator().manual_seed(recipe.seed + 17)
    n_tokens = tasks.VQA_GRID ** 2
    losses: List[float] = []
    for step in range(steps):
        p = tasks.vqa_params(recipe.batch_size, recipe.seed * 10 ** 6 + step)
        turns = [p] + [tasks.vqa_ask(p, (recipe.seed * 10 ** 6 + step) * 100 + t) for t in range(1, recipe.turns)]
        answers = [tasks.vqa_answers(t) for t in turns]
        ids, readout = vqa_dialogue([tasks.vqa_questions(t) for t in turns], answers, n_tokens)
        order = (torch.rand(recipe.batch_size, n_tokens, generator=order_gen).argsort(dim=1)
                 if recipe.shuffle else None)
        logits, tokens = vqa_logits(model, tasks.render_vqa(p), ids, readout, order)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.stack(answers, dim=1).flatten())
        if recipe.align:
            loss = loss + recipe.align * alignment_loss(model, tokens, p["cells"])
        losses.append(_optimizer_step(model, opt, sched, loss))
        _log_progress(recipe.name, step, steps, losses, log_every, start)
    train_s = time.time() - start
    held_out = vqa_report(vqa_predict(model, x_test, q_test), a_test, k_test)
    p_train = tasks.vqa_params(eval_questions, recipe.seed * 10 ** 6)  # the first training batches' seed
    train_acc = vqa_report(vqa_predict(model, tasks.render_vqa(p_train), tasks.vqa_questions(p_train)),
                           tasks.vqa_answers(p_train), p_train["kind"])["accuracy"]
    folder = Path(out_dir) / recipe.name
    folder.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    model.config.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "vocab.json").write_text(json.dumps(tasks.VQA_VOCAB) + "\n")
    import transformers

    record = {"name": recipe.name, "class": recipe.model_class, "steps": steps, "batch_size": recipe.batch_size,
              "seed": recipe.seed, "threads": THREADS, "lr": recipe.lr, "lr_schedule": recipe.lr_schedule,
              "align": recipe.align, "shuffle": recipe.shuffle, "turns": recipe.turns, "visual_tokens": n_tokens,
              "parameters": sum(p.numel() for p in model.parameters()),
              "held_out_accuracy": held_out["accuracy"], "held_out_factor_accuracy": held_out["per_kind"],
              "held_out_clips": eval_questions, "train_accuracy": train_acc, "chance": held_out["chance"],
              "chance_per_kind": held_out["chance_per_kind"],
              "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])), "data_seconds": 0.0,
              "train_seconds": round(train_s, 1), "size_bytes": (folder / "model.safetensors").stat().st_size,
              "sha256_16": state_hash(model), "torch": torch.__version__, "transformers": transformers.__version__,
              "command": f"python -m benchmarks.train_reference {recipe.name}",
              "note": "final_loss is the training loss: answer cross-entropy plus align x the alignment loss; "
                      "held_out_factor_accuracy is per question kind; chance is uniform over each kind's answers"}
    (folder / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)
    return record


LLAVA_RECIPES: Dict[str, LlavaRecipe] = {"llava": LlavaRecipe()}

CHECKED = ("videomae_when", "llava")  # references whose training.json records a reproduction check
# The short run whose hash each new reference records (``check`` in its training.json), so a test can re-run
# the recipe in seconds and see that it still makes the same weights.
CHECK = {"steps": 3, "batch_size": 4, "pool": 64, "eval": 16}


def cpu_kernels() -> str:
    """What bit-exact CPU arithmetic depends on besides the software: torch's CPU capability and the processor
    (the BLAS picks its kernels by vendor), e.g. "AVX512 on AMD EPYC"."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{torch.backends.cpu.get_cpu_capability()} on {model}"


def reproduction_check(name: str) -> Dict[str, object]:
    """Train ``name``'s recipe for ``CHECK['steps']`` steps on small batches (into a temporary folder) and return
    ``{steps, batch_size, sha256_16, torch, transformers, cpu}``: the same code path as the full training (``cpu``:
    the CPU kernels torch dispatches to, which bit-exact weights depend on)."""
    import tempfile
    from dataclasses import replace

    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        if name in LLAVA_RECIPES:
            recipe = replace(LLAVA_RECIPES[name], batch_size=CHECK["batch_size"])
            record = train_llava(recipe, Path(tmp), steps=CHECK["steps"], log_every=0, eval_questions=CHECK["eval"])
        else:
            recipe = replace(RECIPES[name], batch_size=CHECK["batch_size"])
            record = train(recipe, Path(tmp), steps=CHECK["steps"], pool=CHECK["pool"], log_every=0,
                           eval_clips=CHECK["eval"])
    return {"steps": CHECK["steps"], "batch_size": CHECK["batch_size"], "sha256_16": record["sha256_16"],
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": cpu_kernels()}


def record_check(name: str, out_dir: Path) -> None:
    """Add ``reproduction_check(name)`` to ``out_dir / name / training.json``."""
    path = Path(out_dir) / name / "training.json"
    record = json.loads(path.read_text())
    record["check"] = reproduction_check(name)
    path.write_text(json.dumps(record, indent=1) + "\n")


def record_recheck(name: str, out_dir: Path) -> Dict[str, object]:
    """Add this machine's ``reproduction_check(name)`` to the ``rechecks`` of ``out_dir / name / training.json``
    (replacing an older one of the same CPU kernels and versions), without retraining. Bit-exact weights depend
    on the CPU kernels: a recheck lets another machine verify that the recipe is unchanged since it was made."""
    path = Path(out_dir) / name / "training.json"
    record = json.loads(path.read_text())
    check = reproduction_check(name)
    same = ("cpu", "torch", "transformers")
    record["rechecks"] = [c for c in record.get("rechecks", []) if any(c.get(k) != check[k] for k in same)]
    record["rechecks"].append(check)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return check


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"models to train: {', '.join(RECIPES)}")
    parser.add_argument("--all", action="store_true", help="train every reference model")
    parser.add_argument("--out", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count (checks only)")
    parser.add_argument("--pool", type=int, default=None, help="override the training pool size (checks only)")
    parser.add_argument("--recheck", action="store_true", help="no training: record this machine's 3-step "
                        "reproduction hash of the named models (their CPU kernels differ from the recording's)")
    args = parser.parse_args(argv)
    every = list(RECIPES) + list(LLAVA_RECIPES)
    names = every if args.all else args.names
    if not names:
        parser.error(f"name a model ({', '.join(every)}) or pass --all")
    unknown = [n for n in names if n not in every]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(every)}")
    if args.recheck:
        for name in names:
            print(name, record_recheck(name, args.out))
        return
    for name in names:
        if name in LLAVA_RECIPES:
            train_llava(LLAVA_RECIPES[name], args.out, steps=args.steps)
        else:
            train(RECIPES[name], args.out, steps=args.steps, pool=args.pool)
        if name in CHECKED:
            record_check(name, args.out)


if __name__ == "__main__":
    main()
