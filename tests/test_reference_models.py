"""The reference LLaVA and the which-came-first VideoMAE: recipes, their checkpoints, and reproducibility."""
import json

import pytest
import torch

from benchmarks import tasks
from benchmarks import train_reference as tr

NEW_REFERENCES = ("videomae_when", "llava")


def test_llava_training_logits_are_the_models_own():
    # The training loop reads the answers of a multi-turn prompt through the model's own modules (and can
    # permute the visual tokens); without a permutation that must be exactly the plain forward.
    model = tr.build_llava(tr.LLAVA_RECIPES["llava"]).eval()
    p = tasks.vqa_params(3, seed=5)
    turns = [p, tasks.vqa_ask(p, 9)]
    ids, readout = tr.vqa_dialogue([tasks.vqa_questions(t) for t in turns], [tasks.vqa_answers(t) for t in turns])
    pixels = tasks.render_vqa(p)
    with torch.no_grad():
        logits, tokens = tr.vqa_logits(model, pixels, ids, readout)
        # The same arithmetic in other shapes: equal up to the CPU kernels' summation order (AVX-512 GEMMs
        # split some shapes differently), not bit for bit.
        torch.testing.assert_close(logits, model(input_ids=ids, pixel_values=pixels).logits[:, readout],
                                   rtol=1e-5, atol=1e-6)
        order = torch.arange(144).flip(0).expand(3, -1)
        shuffled, _ = tr.vqa_logits(model, pixels, ids, readout, order)
    assert tokens.shape == (3, 144, model.config.text_config.hidden_size)
    assert not torch.equal(shuffled, logits)  # the order reaches the LM
    assert readout == [ids.shape[1] - 5, ids.shape[1] - 1]


def test_llava_alignment_loss_names_each_token():
    model = tr.build_llava(tr.LLAVA_RECIPES["llava"])
    p = tasks.vqa_params(2, seed=1)
    _, tokens = tr.vqa_logits(model, tasks.render_vqa(p), *tr.vqa_dialogue([tasks.vqa_questions(p)], []))
    loss = tr.alignment_loss(model, tokens, p["cells"])
    # Untrained: about the entropy of uniform guesses over 7 colours/none, 12 rows and 12 columns.
    assert abs(float(loss.detach()) - (torch.tensor([7.0, 12.0, 12.0]).log().mean())) < 0.5
    loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_sincos_table_separates_rows_and_columns():
    t = tr.sincos_2d(12, 64)
    assert t.shape == (144, 64)
    same_row = t.view(12, 12, 64)[:, :, :32]
    assert torch.allclose(same_row, same_row[:, :1].expand_as(same_row))  # first half: the row only
    same_col = t.view(12, 12, 64)[:, :, 32:]
    assert torch.allclose(same_col, same_col[:1].expand_as(same_col))  # second half: the column only


@pytest.mark.parametrize("name", NEW_REFERENCES)
def test_short_training_reproduces_the_recorded_hash(name):
    # Three steps of the recipe (small batches) give the weights whose hash the checkpoint's training record
    # holds: the committed recipe is the one that made the checkpoint. Bit-exact only on the same software.
    path = tr.REFERENCE_DIR / name / "training.json"
    if not path.is_file():
        pytest.skip(f"no {name} reference yet (python -m benchmarks.train_reference {name})")
    record = json.loads(path.read_text())
    got = tr.reproduction_check(name)
    import transformers

    assert tr.reproduction_check(name)["sha256_16"] == got["sha256_16"]  # deterministic on this machine
    # Bit-exact weights need the same software and the same CPU kernels: the check made with the checkpoint, or a
    # later recheck of the unchanged recipe on other kernels (python -m benchmarks.train_reference NAME --recheck).
    same = ("torch", "transformers", "cpu")
    checks = [c for c in [record["check"]] + record.get("rechecks", []) if all(c.get(k) == got[k] for k in same)]
    if not checks:
        pytest.skip(f"no check recorded with torch {torch.__version__} / transformers {transformers.__version__} "
                    f"on CPU kernels {got['cpu']}")
    assert got["sha256_16"] == checks[0]["sha256_16"]


def test_reference_llava_is_a_plain_llava_that_reduce_visual_tokens_applies_to():
    if not (tr.REFERENCE_DIR / "llava" / "model.safetensors").is_file():
        pytest.skip("no reference LLaVA yet (python -m benchmarks.train_reference llava)")
    from transformers import LlavaForConditionalGeneration

    from mmmerge.adapters import llava

    model = tr.load_reference("llava")
    assert type(model) is LlavaForConditionalGeneration
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, as trained
    x, q, a, _ = tr.vqa_test_set(64)
    with torch.no_grad():
        full = model(input_ids=tasks.vqa_input_ids(q), pixel_values=x, logits_to_keep=1).logits[:, -1]
        llava.reduce_visual_tokens(model, keep=48, method="divprune")
        reduced = model(input_ids=tasks.vqa_input_ids(q, 48), pixel_values=x, logits_to_keep=1).logits[:, -1]
        llava.restore_visual_tokens(model)
        again = model(input_ids=tasks.vqa_input_ids(q), pixel_values=x, logits_to_keep=1).logits[:, -1]
    assert torch.equal(again, full)
    assert reduced.shape == full.shape and not torch.equal(reduced, full)
    record = json.loads((tr.REFERENCE_DIR / "llava" / "training.json").read_text())
    assert float((full.argmax(-1) == a).float().mean()) > record["chance"] + 0.1  # far above chance


def test_new_recipes_are_listed_and_named_in_their_records():
    assert "videomae_when" in tr.RECIPES and "llava" in tr.LLAVA_RECIPES
    assert tr.RECIPES["videomae_when"].task == "when"
    for name in NEW_REFERENCES:
        path = tr.REFERENCE_DIR / name / "training.json"
        if path.is_file():
            record = json.loads(path.read_text())
            assert record["command"] == f"python -m benchmarks.train_reference {name}"
            assert record["held_out_accuracy"] > record["chance"]
