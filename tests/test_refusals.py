"""Refusals at patch time: each names the problem, and the advice it gives works when applied."""
from __future__ import annotations

import re

import pytest
import torch
from transformers import VideoMAEModel, VivitModel

import mmmerge
from mmmerge import KeepRatio, TargetFlops, TargetTokens
from mmmerge.adapters import audio, video

from helpers import tiny_ast, tiny_video, untouched

PATCHES = [("audio.patch", tiny_ast, audio.patch), ("video.patch", lambda: tiny_video(VideoMAEModel), video.patch)]


# ---------------------------------------------------------------------------------------- booleans are bools
FLAGS = [(where, make, patch, flag) for where, make, patch in PATCHES
         for flag in ("prop_attn", "group_budget", "trace_source") + (("drop_padding", "within_band")
                                                                      if where == "audio.patch" else ())]


@pytest.mark.parametrize("where, make, patch, flag", FLAGS, ids=[f"{w}-{f}" for w, _, _, f in FLAGS])
@pytest.mark.parametrize("value", ["no", 0, 1, "False", None, torch.tensor(True)])
def test_on_off_options_must_be_bools(where, make, patch, flag, value):
    model = make()
    if flag == "prop_attn" and value is None:
        patch(model, r=2, prop_attn=None)  # None is prop_attn's default (on, off for prune)
        return
    allowed = "True, False or None" if flag == "prop_attn" else "True or False"
    with pytest.raises(TypeError, match=rf"{re.escape(where)}: {flag} must be {allowed}\b.*, got "):
        patch(model, r=2, time_mode="same_band" if where == "audio.patch" else "within_frame", **{flag: value})
    assert untouched(model)


def test_prop_attn_no_is_refused_not_taken_as_true():
    model = tiny_ast()
    with pytest.raises(TypeError, match=r"prop_attn must be True, False or None \(the default: on, off for prune\), "
                                        r"got 'no' \(str\)"):
        mmmerge.patch(model, r=2, prop_attn="no")
    assert untouched(model)


# -------------------------------------------------------------------------------------- typos in patch options
@pytest.mark.parametrize("where, make, patch", PATCHES, ids=["audio", "video"])
def test_a_misspelled_patch_option_names_patch_and_suggests_the_option(where, make, patch):
    model = make()
    for typo, meant in (("methd", "method"), ("time_mod", "time_mode"), ("prop_atn", "prop_attn"),
                        ("group_budgets", "group_budget"), ("trace_sources", "trace_source")):
        with pytest.raises(ValueError, match=rf"^{re.escape(where)} has no option '{typo}'; did you mean '{meant}'\?$"):
            patch(model, r=2, **{typo: "tome" if meant == "method" else True})
        with pytest.raises(ValueError, match=rf"has no option '{typo}'; did you mean '{meant}'"):
            mmmerge.patch(model, r=2, **{typo: "tome" if meant == "method" else True})  # the dispatcher says the same
        assert untouched(model)
    with pytest.raises(ValueError, match=rf"{re.escape(where)} has no option 'colour'; its options are: r, method, "
                                         r".*; method 'pitome' takes: alpha, margin, preset"):
        patch(model, r=2, method="pitome", colour="red")  # nothing close: both lists
    # Matcher options stay the matcher's: a typo of one is named with the method, and suggested.
    with pytest.raises(ValueError, match=r"method 'pitome' takes no option 'margn'; its options are: alpha, margin, "
                                         r"preset; did you mean 'margin'\?"):
        patch(model, r=2, method="pitome", margn=0.5)
    with pytest.raises(ValueError, match=r"method 'tome' takes no option 'temperature'; its options are: parity"):
        patch(model, r=2, method="tome", temperature=0.5)  # another method's option
    assert untouched(model)


# ------------------------------------------------------------------------------------------- schedule messages
def test_tome_inflect_outside_its_range_names_the_rule():
    model = tiny_ast()
    with pytest.raises(ValueError, match=r"r=\(8, 1.5\): ToMe's inflect rule runs r linearly from r \* \(1 - inflect\) "
                                         r"at the first layer to r \* \(1 \+ inflect\) at the last, here -4 to 20; "
                                         r"inflect must lie in \[-1, 1\]"):
        audio.patch(model, r=(8, 1.5))
    with pytest.raises(ValueError, match=r"layer 2: r=12 is infeasible.*\(r=\(6, 1.0\) is the schedule \[0, 6, 12\] by "
                                         r"ToMe's inflect rule\)"):
        audio.patch(model, r=(6, 1.0))  # within the range, but too much for the last layer
    assert untouched(model)
    audio.patch(model, r=(4, 1.0))
    assert mmmerge.last_info(model).schedule == [0, 4, 8]


@pytest.mark.parametrize("where, make, patch, steps, unit", [
    ("audio", tiny_ast, audio.patch, 8, "columns"), ("video", lambda: tiny_video(VivitModel), video.patch, 4, "tubelets")])
def test_a_window_as_wide_as_the_input_is_refused_as_global_under_another_name(where, make, patch, steps, unit):
    model = make()
    for k in (steps, 99):
        with pytest.raises(ValueError, match=rf"time_mode 'window\({k}\)': a window of {k} {unit} holds the whole "
                                             rf"input \({steps} {unit}\), so it constrains nothing and is "
                                             rf"time_mode='global'; pass 'global', or k < {steps}"):
            patch(model, r=2, time_mode=f"window({k})")
        assert untouched(model)
    patch(model, r=2, time_mode=f"window({steps - 1})")
    patch(model, r=2, time_mode="global")


# ------------------------------------------------------------------------------------- advice that must work
def _ways(message: str):
    """The advice of a refusal as patch keyword changes."""
    ways = []
    largest = re.search(r"the largest constant r for \d+ layers is (\d+)", message)
    if largest and int(largest.group(1)) > 0:
        ways.append({"r": int(largest.group(1))})
    if "what meets it instead: " in message:
        for part in message.split("what meets it instead: ")[1].split(", or "):
            if part.startswith("method '"):
                ways.append({"method": part.split("'")[1]})
            elif part.startswith("time_mode='global'"):
                ways.append({"time_mode": "global", "within_band": False})
            elif part.startswith("a target of TargetFlops("):
                ways.append({"r": TargetFlops(float(re.search(r"TargetFlops\(([\d.]+)\)", part).group(1)))})
            else:
                raise AssertionError(f"advice not understood: {part!r}")
    if "use another method" in message:  # dominant's per-group refusal: the first advice is group_budget=False
        ways.append({"group_budget": False})
    return ways


REFUSED = [
    # tps, prune and pitome keep one token per column in each band under adjacent + within_band
    *[(m, {"time_mode": "adjacent", "within_band": True, "r": TargetFlops(0.5)}) for m in ("tps", "prune", "pitome")],
    *[(m, {"time_mode": "adjacent", "within_band": True, "r": 2}) for m in ("tps", "prune", "pitome")],
    ("tome", {"time_mode": "adjacent", "r": TargetFlops(0.2)}),  # out of reach, but a milder target is not
    ("tome", {"time_mode": "same_band", "r": 8}),  # too much for a bipartite step inside one band
    ("tome", {"r": (6, 1.0)}),  # ToMe's inflect rule asks the last layer for more than it can take
    ("tome", {"time_mode": "same_band", "r": TargetTokens(5)}),
    ("dominant", {"time_mode": "same_band", "r": 2}),  # selects over all tokens: no per-band share
]


@pytest.mark.parametrize("method, kwargs", REFUSED, ids=[f"{m}-{i}" for i, (m, _) in enumerate(REFUSED)])
def test_every_refusal_gives_advice_that_patches_when_applied(method, kwargs):
    model = tiny_ast()
    with pytest.raises(ValueError) as err:
        audio.patch(model, method=method, **kwargs)
    message = str(err.value)
    assert untouched(model)
    ways = _ways(message)
    assert ways, message
    assert method not in [w.get("method") for w in ways], message  # never the method just refused
    for change in ways:
        audio.patch(model, **{"method": method, **kwargs, **change})  # applying the advice works
        assert mmmerge.last_info(model).tokens_out < mmmerge.last_info(model).tokens_per_layer[0] or \
            change.get("r") == 0, (change, message)
        mmmerge.unpatch(model)


def test_advice_never_names_a_method_that_fails_too():
    model = tiny_ast()
    with pytest.raises(ValueError) as err:
        audio.patch(model, method="pitome", time_mode="adjacent", within_band=True, r=TargetFlops(0.5))
    message = str(err.value)
    assert "method 'tps'" not in message and "method 'prune'" not in message  # they keep one token per column too
    assert "(tps, prune)" not in message
    assert "cannot remove any token" in message


def test_a_milder_target_is_offered_only_when_one_is_reachable():
    model = tiny_ast()
    with pytest.raises(ValueError, match=r"a target of TargetFlops\(0\.\d+\) or more"):
        audio.patch(model, method="tome", time_mode="adjacent", r=TargetFlops(0.2))
    with pytest.raises(ValueError) as err:
        audio.patch(model, method="tps", time_mode="adjacent", within_band=True, r=TargetFlops(0.5))
    assert "a target of" not in str(err.value)  # tps removes nothing there: no target helps
    with pytest.raises(ValueError, match=r"KeepRatio must be in \(0, 1\]"):
        audio.patch(model, r=KeepRatio(0))  # a bad value, not an infeasible one: no advice
