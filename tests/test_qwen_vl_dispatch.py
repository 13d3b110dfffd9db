"""One entry point for every VLM: ``mmmerge.adapters.llava``'s functions take Qwen-VL models too, with the
Qwen-VL package's defaults, and give exactly what the package's own functions give."""
import pytest
import torch

from mmmerge.adapters import llava, qwen_vl
from test_qwen_vl import MIXED, batch, tiny


@torch.no_grad()
def _reduced_logits(reduce, compact, **options):
    model = tiny("qwen2_vl")
    inputs = batch("qwen2_vl", MIXED)
    reduce(model, method="tome", **options)
    ids, mask, types = compact(inputs["input_ids"], inputs["attention_mask"], model,
                               image_grid_thw=inputs["image_grid_thw"], video_grid_thw=inputs["video_grid_thw"],
                               mm_token_type_ids=inputs["mm_token_type_ids"])
    logits = model(**{**inputs, "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}).logits
    return model, logits


@pytest.mark.parametrize("options", [{}, {"keep": 0.5, "time_mode": "within_frame"}], ids=["defaults", "given"])
def test_llava_entry_points_reduce_a_qwen_model_as_the_qwen_package_does(options):
    model, through_llava = _reduced_logits(llava.reduce_visual_tokens, llava.compact_image_tokens, **options)
    _, direct = _reduced_logits(qwen_vl.reduce_visual_tokens, qwen_vl.compact_image_tokens, **options)
    assert torch.equal(through_llava, direct)
    llava.restore_visual_tokens(model)
    assert model.__dict__.get("_mmmerge_undo") is None


def test_qwen_only_inputs_are_refused_for_a_llava_model():
    from test_llava import tiny_llava

    model = tiny_llava()
    llava.reduce_visual_tokens(model, keep=16)
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(TypeError, match="only Qwen-VL"):
        llava.compact_image_tokens(ids, None, model, image_grid_thw=torch.tensor([[1, 4, 4]]))


def test_a_misspelled_option_names_the_entry_point_for_a_qwen_model_too():
    model = tiny("qwen2_vl")
    with pytest.raises(ValueError, match="reduce_visual_tokens has no option 'methd'; did you mean 'method'"):
        llava.reduce_visual_tokens(model, keep=0.5, methd="tome")
    assert model.__dict__.get("_mmmerge_undo") is None
