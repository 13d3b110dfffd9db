"""The compiled path of a reduced LLaVA: a reduced prompt's length is fixed by ``keep``, so the language model can run
with a static cache under ``torch.compile``. Tiny random models on the CPU (fp32: exact tokens)."""
from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig

from mmmerge.adapters import llava
from test_llava import EXACT, PAD, pixels, prompt, tiny_llava
from test_llava_next import SQUARE, TALL, WIDE, batch, next_processor, picture, tiny_next

K = 16
STEPS = 5


def _generate(model, **kwargs):
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=STEPS, do_sample=False, pad_token_id=PAD, output_scores=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores, 1)


def _reduced(kind: str):
    """A reduced model and the inputs of one batch (two prompts, several images)."""
    if kind == "llava":
        model = tiny_llava()
        llava.reduce_visual_tokens(model, keep=K, method="tome")
        rows = [prompt(3, "img", 4, "img", 5, per_image=K), prompt(6, "img", 7, 8, 9, per_image=K)]
        width = max(r.shape[1] for r in rows)
        ids = torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0), value=PAD) for r in rows])  # left
        return model, dict(input_ids=ids, attention_mask=(ids != PAD).long(), pixel_values=pixels(3))
    model, proc = tiny_next(), next_processor()
    llava.reduce_visual_tokens(model, keep=0.25, method="dominant", processor=proc)
    return model, batch(proc, [picture(WIDE), picture(TALL, 1), picture(SQUARE, 2)],
                        ["w5 <image> w6 <image>", "w7 <image> w8"])


def _assert_same(a, b):
    if EXACT:
        assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-4 if EXACT else 3e-2, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llava", "next"])
def test_static_cache_generate_equals_dynamic(kind):
    model, inputs = _reduced(kind)
    _assert_same(_generate(model, **inputs, cache_implementation="static"), _generate(model, **inputs))


def test_compiled_static_cache_generate_equals_eager():
    # transformers compiles the decoding forward itself for a static cache on a GPU; on the CPU it is asked to.
    model, inputs = _reduced("llava")
    compile_config = CompileConfig(fullgraph=False, dynamic=False)
    compile_config._compile_all_devices = True
    calls = []
    original = type(model).get_compiled_call

    def spy(self, config):
        calls.append(config)
        return original(self, config)

    type(model).get_compiled_call = spy
    try:
        compiled = _generate(model, **inputs, cache_implementation="static", compile_config=compile_config)
    finally:
        type(model).get_compiled_call = original
    assert calls  # the decoding forward ran compiled
    _assert_same(compiled, _generate(model, **inputs))


def test_compiled_reduced_forward_equals_eager():
    # The whole reduced model under torch.compile (its replaced methods resolve the model's own functions without
    # a lookup through the instance, which dynamo would resolve to the replacement itself).
    torch._dynamo.reset()
    model, inputs = _reduced("llava")
    with torch.no_grad():
        eager = model(**inputs).logits
        compiled = torch.compile(model)(**inputs).logits
    assert compiled.shape == eager.shape and compiled.shape[1] == inputs["input_ids"].shape[1]
    torch.testing.assert_close(compiled, eager, atol=1e-5 if EXACT else 3e-2, rtol=1e-4)


def test_example_runs_batched_and_compiled(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "llava_vqa.py"
    spec = importlib.util.spec_from_file_location("llava_vqa_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--batch", "2", "--compile", "--repeats", "1", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert "compiled] visual tokens 16 per prompt, prefill 2 x" in out and "visual tokens 64 per prompt" in out
