"""Named presets where the papers and the released code differ: TPS's host weight at temperature != 1."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mmmerge as mm
from mmmerge.adapters import audio
from mmmerge.matchers import TPS_PRESETS

from helpers import output, spectrogram, tiny_ast, untouched


def released_tps(reserved, pruned, temperature=1.0):
    """The released TPS squeeze (Wei et al., MegEngine ``TPS.forward`` at inference), one batch element, with a
    temperature on the pruned tokens' similarities: each pruned token goes to its most similar reserved token with
    weight ``exp(cos / temperature)``, the host keeps weight ``e``; ``[K, C]``, ``[R, C]`` -> ``[K, C]``."""
    cos = F.normalize(pruned.double(), dim=-1) @ F.normalize(reserved.double(), dim=-1).T  # [R, K]
    best = cos.max(dim=1, keepdim=True).values
    mask = (cos == best).double()
    numerator = (torch.exp(cos / temperature) * mask).T  # [K, R]
    denominator = math.e + numerator.sum(-1, keepdim=True)
    return reserved.double() * (math.e / denominator) + (numerator / denominator) @ pruned.double()


def paper_tps(reserved, pruned, temperature=1.0):
    """The paper's similarity softmax: the host takes part with its own similarity 1, ``exp(1 / temperature)``."""
    cos = F.normalize(pruned.double(), dim=-1) @ F.normalize(reserved.double(), dim=-1).T
    mask = (cos == cos.max(dim=1, keepdim=True).values).double()
    numerator = (torch.exp(cos / temperature) * mask).T
    host = math.exp(1.0 / temperature)
    denominator = host + numerator.sum(-1, keepdim=True)
    return reserved.double() * (host / denominator) + (numerator / denominator) @ pruned.double()


def squeezed(x, score, temperature, **preset):
    state = mm.init_state(1, x.shape[1])
    plan = mm.plan_merge(x, state, 1, "tps", score=score, temperature=temperature, **preset)
    return mm.merge_tokens(x, state, plan)[0][0]


# Three tokens: the last (least important) goes into the first, its most similar.
X = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]]])
SCORE = torch.tensor([[1.0, 0.9, 0.0]])


def test_tps_presets_follow_the_paper_and_the_released_code():
    reserved, pruned = X[0, :2], X[0, 2:]
    for temperature in (0.1, 1.0, 5.0):
        paper = squeezed(X, SCORE, temperature)  # the default
        assert torch.equal(paper, squeezed(X, SCORE, temperature, preset="paper"))
        official = squeezed(X, SCORE, temperature, preset="official")
        torch.testing.assert_close(paper.double(), paper_tps(reserved, pruned, temperature))
        torch.testing.assert_close(official.double(), released_tps(reserved, pruned, temperature))
    # At temperature 1 both are the released code (which has no temperature); at 0.1 they differ a lot: the
    # paper's host weight exp(1 / 0.1) outweighs a token of cosine 0.8, the released code's e does not.
    torch.testing.assert_close(squeezed(X, SCORE, 1.0, preset="paper"), squeezed(X, SCORE, 1.0, preset="official"))
    paper, official = squeezed(X, SCORE, 0.1)[0, 0], squeezed(X, SCORE, 0.1, preset="official")[0, 0]
    w_paper, w_official = math.exp((0.8 - 1) / 0.1), math.exp(0.8 / 0.1 - 1)  # relative to the host's weight
    assert float(paper) == pytest.approx((1 + 0.8 * w_paper) / (1 + w_paper), rel=1e-5)  # 0.976
    assert float(official) == pytest.approx((1 + 0.8 * w_official) / (1 + w_official), rel=1e-5)  # 0.800
    assert set(TPS_PRESETS) == {"paper", "official"}


def test_tps_preset_is_checked_as_the_tps_preset_and_reaches_the_encoder_patch():
    with pytest.raises(ValueError, match="unknown tps preset 'official_deit'; choose one of paper, official"):
        mm.check_options("tps", {"preset": "official_deit"})  # a PiToMe preset, not TPS's
    mm.check_options("pitome", {"preset": "official_deit"})
    with pytest.raises(ValueError, match="unknown pitome preset 'paper '"):
        mm.check_options("pitome", {"preset": "paper "})
    model = tiny_ast()
    with pytest.raises(ValueError, match="unknown tps preset 'offical'"):
        audio.patch(model, r=4, method="tps", preset="offical")
    assert untouched(model)
    x = spectrogram()
    audio.patch(model, r=4, method="tps", temperature=0.1)
    paper = output(model, x)
    audio.patch(model, r=4, method="tps", temperature=0.1, preset="official")
    official = output(model, x)
    audio.patch(model, r=4, method="tps", temperature=0.1, preset="paper")
    assert torch.equal(output(model, x), paper) and not torch.equal(official, paper)
