"""One validation path: every entry point rejects unknown or invalid options up front, with the same message."""
from __future__ import annotations

import pytest
import torch

import mmmerge
from mmmerge.adapters import audio, llava, video

from helpers import tiny_ast, tiny_video, untouched
from transformers import VideoMAEModel

BAD_OPTIONS = [
    ("pitome", {"marign": 0.5}, ValueError, "takes no option 'marign'; its options are: alpha, layer_idx, margin"),
    ("pitome", {"preset": "offical"}, ValueError, "unknown pitome preset 'offical'"),
    ("pitome", {"alpha": 0}, ValueError, "alpha must be > 0"),
    ("tps", {"temperature": 0.0}, ValueError, "temperature must be > 0"),
    ("tps", {"temperature": "hot"}, TypeError, "temperature must be a number"),
    ("random", {"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ("dominant", {"contextual": 0}, ValueError, "contextual must be a positive int"),
    ("tome", {"temperature": 1.0}, ValueError, "'tome' takes no option 'temperature'; its options are: parity"),
]


@pytest.mark.parametrize("method, options, error, message", BAD_OPTIONS)
def test_engine_entry_points_reject_bad_options(method, options, error, message):
    x = torch.randn(2, 20, 8)
    state = mmmerge.init_state(2, 20)
    with pytest.raises(error, match=message):
        mmmerge.reduce_tokens(x, 8, method, **options)
    with pytest.raises(error, match=message):
        mmmerge.plan_merge(x, state, 4, method, **options)
    with pytest.raises(error, match=message):
        mmmerge.check_options(method, options)


@pytest.mark.parametrize("method, options, error, message",
                         [case for case in BAD_OPTIONS if case[0] != "dominant"])  # dominant is LLaVA's
def test_encoder_patches_reject_the_same_options_untouched(method, options, error, message):
    for model, patch in ((tiny_video(VideoMAEModel), video.patch), (tiny_ast(), audio.patch)):
        message = message.replace("layer_idx, margin", "margin, preset")  # the patch sets the layer itself
        with pytest.raises(error, match=message):
            patch(model, r=2, method=method, **options)
        assert untouched(model)


@pytest.mark.parametrize("bad, error, message", [
    (3, TypeError, "time_mode must be a string"),
    ("sideways", ValueError, "unknown time_mode 'sideways'"),
    ("window(x)", ValueError, r"k in window\(k\) must be a positive integer"),
    ("window", ValueError, r"for a window write 'window\(k\)'"),
])
def test_one_time_mode_parser_gives_one_message(bad, error, message):
    for model, patch in ((tiny_video(VideoMAEModel), video.patch), (tiny_ast(), audio.patch)):
        with pytest.raises(error, match=message):
            patch(model, r=2, time_mode=bad)
    with pytest.raises(error, match=message):
        mmmerge.parse_time_mode(bad)
    from test_llava import tiny_video as tiny_video_llava

    model = tiny_video_llava()
    with pytest.raises(error, match=message):  # LLaVA videos go through the same parser
        llava.reduce_visual_tokens(model, keep=8, time_mode=bad)
    assert not hasattr(model, "_mmmerge_llava")


def test_a_window_is_spelled_one_way_everywhere():
    from test_llava import tiny_video as tiny_video_llava

    for model, patch in ((tiny_video(VideoMAEModel), video.patch), (tiny_ast(), audio.patch)):
        with pytest.raises(ValueError, match=r"no option 'window'; use time_mode='window\(k\)'"):
            patch(model, r=2, time_mode="window", window=2)
    with pytest.raises(ValueError, match=r"no option 'window'; use time_mode='window\(k\)'"):
        llava.reduce_visual_tokens(tiny_video_llava(), keep=8, time_mode="window", window=2)


def test_unmerge_refuses_tokens_of_another_batch():
    y, state = mmmerge.reduce_tokens(torch.randn(2, 10, 4), 4)
    with pytest.raises(ValueError, match="hold 3 batch elements but the state describes 2"):
        mmmerge.unmerge(torch.randn(3, 4, 4), state)
    assert mmmerge.unmerge(y, state).shape == (2, 10, 4)


def test_a_score_or_noise_of_the_wrong_shape_is_named():
    x = torch.randn(2, 20, 8)
    with pytest.raises(ValueError, match=r"score must be \[B, N\]=\[2, 20\]"):
        mmmerge.reduce_tokens(x, 8, "tps", score=torch.rand(2, 19))
    with pytest.raises(ValueError, match=r"noise must be \[B, N\]=\[2, 20\]"):
        mmmerge.plan_merge(x, mmmerge.init_state(2, 20), 4, "random", noise=torch.rand(20))
