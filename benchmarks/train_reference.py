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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

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
                  steps=1200, pool=6144, aux_mean_pool=1.0),
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
    if recipe.name in ("ast", "vivit"):
        # transformers starts AST's and ViViT's CLS (and distillation) tokens and learned position embeddings
        # at zero (they are meant to be loaded from a checkpoint). From scratch that leaves every token
        # position-blind. So the special tokens are drawn like ViT's and the patch positions start from the
        # sinusoid table VideoMAE uses (then learned as usual). That alone was not enough: both still sat at
        # chance on the order factors until the auxiliary mean-pool loss (Recipe.aux_mean_pool) was added,
        # and ViViT learned the flash order only with a constant learning rate (in 800 steps).
        from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

        if recipe.name == "ast":
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

    recipe = RECIPES[name]
    folder = Path(directory or REFERENCE_DIR) / name
    config_cls = type(recipe.make_config())
    config = config_cls.from_pretrained(folder)
    config._attn_implementation = "sdpa"
    model = getattr(transformers, recipe.model_class)(config)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
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
           "audio": {"order": (4, 2), "sweep": (2, 2), "gap": (1, 2)}}


def factor_accuracy(name: str, pred: Tensor, y: Tensor) -> Dict[str, float]:
    """Accuracy of each factor of the label alone (e.g. video: direction and flash order)."""
    factors = FACTORS["audio" if name == "ast" else "video"]
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            recent = sum(losses[-log_every:]) / log_every
            print(f"[{recipe.name}] step {step + 1}/{steps} loss {recent:.3f} ({time.time() - start:.0f} s)", flush=True)
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
              "lr_schedule": recipe.lr_schedule, "aux_mean_pool": recipe.aux_mean_pool,
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


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"models to train: {', '.join(RECIPES)}")
    parser.add_argument("--all", action="store_true", help="train vivit, videomae and ast")
    parser.add_argument("--out", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count (checks only)")
    parser.add_argument("--pool", type=int, default=None, help="override the training pool size (checks only)")
    args = parser.parse_args(argv)
    names = list(RECIPES) if args.all else args.names
    if not names:
        parser.error("name a model (vivit, videomae, ast) or pass --all")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {', '.join(RECIPES)}")
    for name in names:
        train(RECIPES[name], args.out, steps=args.steps, pool=args.pool)


if __name__ == "__main__":
    main()
