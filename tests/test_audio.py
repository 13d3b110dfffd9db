"""Audio adapter on tiny random AST models (no network): off switch, band/time modes, padding, I/O, features."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import (ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel, ViTConfig,
                          ViTModel)

import mmmerge
from mmmerge import KeepRatio, TargetFlops
from mmmerge.adapters import audio
from mmmerge.adapters.encoder import MergingLayer

from helpers import untouched

MELS, FRAMES, PATCH, STRIDE = 32, 128, 16, 8  # 3 bands x 15 columns = 45 tokens, + CLS + distillation
BANDS, COLUMNS, TOKENS = 3, 15, 47
CLASSES = [ASTForAudioClassification, ASTModel]
METHODS = ["tome", "pitome", "tps", "random", "prune"]


def tiny(cls=ASTForAudioClassification, attn="eager", layers=3, seed=0):
    torch.manual_seed(seed)
    config = ASTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                       num_mel_bins=MELS, max_length=FRAMES, patch_size=PATCH, frequency_stride=STRIDE,
                       time_stride=STRIDE, num_labels=5)
    config._attn_implementation = attn
    return cls(config).eval()


def spectrogram(batch=2, seed=1):
    return torch.randn(batch, FRAMES, MELS, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def output(model, x):
    out = model(input_values=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def groups_of(source: torch.Tensor, values: torch.Tensor):
    """For one batch element: {group id: set of values of its original tokens}."""
    groups = {}
    for g, v in zip(source.tolist(), values.tolist()):
        groups.setdefault(g, set()).add(v)
    return groups


def original(name: str, columns: int = COLUMNS) -> torch.Tensor:
    """Coordinate ``name`` of every original token ``[N0]``."""
    layout = audio.AudioLayout(2, BANDS, columns, COLUMNS, STRIDE, STRIDE, PATCH, FRAMES, MELS)
    return audio._position_coords(layout)[0][name]


# ------------------------------------------------------------------------------------------- layout
def test_layout_from_config_and_real_size():
    layout = audio.ast_layout(tiny())
    assert (layout.bands, layout.columns, layout.num_tokens) == (BANDS, COLUMNS, TOKENS)
    base = audio.ast_layout(ASTModel(ASTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                               intermediate_size=32)))
    assert (base.bands, base.columns, base.num_tokens) == (12, 101, 1214)  # AST-base on AudioSet


def test_tokens_are_frequency_major_with_band_and_column_coordinates():
    """Each patch embedding equals the conv applied to the (band, column) patch its coordinates name."""
    model = tiny(ASTModel)
    x = spectrogram(1)
    with torch.no_grad():
        emb = model.embeddings.patch_embeddings(x)[0]  # [F' * T', C]
        conv = model.embeddings.patch_embeddings.projection
        image = x[0].T  # [mel, frames]
        f, t = original("f")[2:].long(), original("t")[2:].long()
        sec_min, sec_max = original("sec_min")[2:], original("sec_max")[2:]
        for i in range(emb.shape[0]):
            patch = image[f[i] * STRIDE:f[i] * STRIDE + PATCH, t[i] * STRIDE:t[i] * STRIDE + PATCH]
            manual = (conv.weight[:, 0] * patch).sum((1, 2)) + conv.bias
            torch.testing.assert_close(emb[i], manual, atol=1e-5, rtol=1e-5)
            assert sec_min[i] == pytest.approx(t[i] * STRIDE * 0.01)
            assert sec_max[i] == pytest.approx((t[i] * STRIDE + PATCH) * 0.01)
    assert f.tolist() == [i // COLUMNS for i in range(BANDS * COLUMNS)]


# ---------------------------------------------------------------------------------------- off switch
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_off_switch_reproduces_unpatched(cls, attn):
    model = tiny(cls, attn)
    x = spectrogram()
    reference = output(model, x)
    for off in (0, KeepRatio(1.0), [0, 0, 0]):
        for mode in ("global", "same_band", "adjacent"):
            audio.patch(model, r=off, time_mode=mode)
            assert mmmerge.last_info(model).schedule == [0, 0, 0]
            torch.testing.assert_close(output(model, x), reference, atol=1e-6, rtol=0)
    audio.patch(model, r=0, lengths=[40, 70], drop_padding=False)  # a valid mask alone changes nothing
    torch.testing.assert_close(output(model, x), reference, atol=1e-6, rtol=0)
    assert mmmerge.last_info(model).tokens_per_layer == [TOKENS] * 4
    assert not any(isinstance(m, MergingLayer) for m in model.modules())  # nothing was replaced


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_unpatch_restores_bit_identical(cls):
    model = tiny(cls, "sdpa")
    x = spectrogram()
    reference = output(model, x)
    weights = copy.deepcopy(model.state_dict())
    audio.patch(model, r=4, method="pitome", time_mode="adjacent", lengths=60, trace_source=True)
    merged = output(model, x)
    assert merged.shape != reference.shape or not torch.allclose(merged, reference)
    mmmerge.unpatch(model)
    assert torch.equal(output(model, x), reference)
    assert untouched(model)
    assert not audio._backbone(model).embeddings._forward_hooks  # no hook anywhere
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_dispatch_and_repatch_replaces():
    model = tiny()
    x = spectrogram()
    mmmerge.patch(model, r=6, time_mode="same_band")
    output(model, x)
    assert mmmerge.last_info(model).tokens_per_layer == [47, 41, 35, 29]
    mmmerge.patch(model, r=2)  # replaces, never stacks
    output(model, x)
    assert mmmerge.last_info(model).tokens_per_layer == [47, 45, 43, 41]


# ------------------------------------------------------------------------------------- merge rules
def merged_source(model, x, **kwargs):
    audio.patch(model, trace_source=True, **kwargs)
    out = output(model, x)
    info = mmmerge.last_info(model)
    assert torch.isfinite(out).all()
    return info


@pytest.mark.parametrize("method", METHODS)
def test_cls_and_distillation_stay_first_and_unmerged(method):
    model = tiny()
    info = merged_source(model, spectrogram(), r=9, method=method)
    source = info.source
    assert info.tokens_per_layer == [47, 38, 29, 20]
    assert source[:, 0].tolist() == [0, 0] and source[:, 1].tolist() == [1, 1]
    assert (source[:, 2:] >= 2).all()  # nothing else joined them
    assert (info.size[:, :2] == 1).all()
    assert (info.state.coords["f"][:, :2] == -1).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [True, False])
def test_same_band_never_groups_two_bands(method, budget):
    model = tiny()
    info = merged_source(model, spectrogram(), r=6, method=method, time_mode="same_band", group_budget=budget)
    band = original("f")
    merged_any = False
    for b in range(2):
        for members in groups_of(info.source[b], band).values():
            assert len(members) == 1
        merged_any |= bool((info.size[b] > 1).any())
    assert merged_any
    if budget:  # every band removed the same share: 15 - 2 * 3 layers = 9 tokens per band
        for b in range(2):
            counts = torch.bincount(info.state.coords["f"][b, 2:].long(), minlength=BANDS)
            assert counts.tolist() == [COLUMNS - 2 * 3] * BANDS


def test_band_rule_shares_any_r_over_the_bands():
    model = tiny()
    info = merged_source(model, spectrogram(), r=4, time_mode="same_band")  # 4 over 3 bands: uneven shares
    for b in range(2):
        counts = torch.bincount(info.state.coords["f"][b, 2:].long(), minlength=BANDS)
        assert counts.sum() == BANDS * COLUMNS - 12 and counts.max() - counts.min() <= 1
    with pytest.raises(ValueError, match="no option 'band_budget'; use group_budget"):
        audio.patch(model, r=4, time_mode="same_band", band_budget=False)


def contiguous(columns: set) -> bool:
    return columns == set(range(int(min(columns)), int(max(columns)) + 1))


ADJACENT_CASES = [(m, False) for m in ("tome", "pitome", "tps", "random")] + [(m, True) for m in ("tome", "random")]


@pytest.mark.parametrize("method,within_band", ADJACENT_CASES)
def test_adjacent_spans_stay_contiguous(method, within_band):
    # pitome/tps keep one token per column and band under same band AND adjacent (a band has one token
    # per column): nothing is left to remove, and the patch says so (test below).
    model = tiny(layers=4)
    info = merged_source(model, spectrogram(), r=6, method=method, time_mode="adjacent", within_band=within_band)
    column, band = original("t"), original("f")
    t_min, t_max = info.state.coords["t_min"], info.state.coords["t_max"]
    wide = 0
    for b in range(2):
        for g, members in groups_of(info.source[b, 2:], column[2:]).items():
            assert contiguous(members), members
            assert (t_min[b, g], t_max[b, g]) == (min(members), max(members))
            wide += len(members) > 1
        if within_band:
            assert all(len(m) == 1 for m in groups_of(info.source[b], band).values())
    assert wide > 0  # some tokens really merged along time


@pytest.mark.parametrize("method", ["tps", "prune", "pitome"])
def test_select_methods_under_band_and_adjacent_are_refused_at_patch_time(method):
    model = tiny()
    with pytest.raises(ValueError, match="can remove at most 0"):
        audio.patch(model, r=3, method=method, time_mode="adjacent", within_band=True)
    assert untouched(model)


def test_window_keeps_groups_inside_blocks():
    model = tiny(layers=4)
    info = merged_source(model, spectrogram(), r=8, time_mode="window(4)")
    block = torch.div(original("t"), 4, rounding_mode="floor")
    for b in range(2):
        assert all(len(m) == 1 for m in groups_of(info.source[b], block).values())
    with pytest.raises(ValueError, match="time_mode"):
        audio.patch(model, r=2, time_mode="within_frame")
    for bad in ("window(x)", "window(-1)"):
        with pytest.raises(ValueError, match=r"window\(k\)"):
            audio.patch(model, r=2, time_mode=bad)
    with pytest.raises(ValueError, match="positive integer"):
        audio.patch(model, r=2, time_mode="window(0)")
    with pytest.raises(TypeError, match="time_mode must be a string"):
        audio.patch(model, r=2, time_mode=None)


# -------------------------------------------------------------------------------------------- padding
PADDING_CASES = [(m, mode) for m in ("tome", "pitome", "tps", "prune") for mode in ("global", "same_band", "adjacent")
                 if (m, mode) != ("pitome", "same_band")]  # pitome: too few allowed pairs in a mostly padded band


@pytest.mark.parametrize("method,mode", PADDING_CASES)
def test_padded_columns_never_group_with_real_ones(method, mode):
    model = tiny(layers=4)
    lengths = [30, 75]  # 4 and 10 real columns of 15
    info = merged_source(model, spectrogram(), r=6, method=method, time_mode=mode, lengths=lengths,
                         drop_padding=False)
    column = original("t")
    mixed_padding = False
    for b, length in enumerate(lengths):
        real = (column < -(-length // STRIDE)).tolist()  # CLS/dist (-1) count as real
        for members in groups_of(info.source[b], torch.tensor(real)).values():
            assert len(members) == 1
        padded_groups = groups_of(info.source[b], torch.tensor(real))
        mixed_padding |= any(m == {False} for m in padded_groups.values())
        assert (info.state.valid[b] == torch.tensor([True in groups_of(info.source[b], torch.tensor(real))[g]
                                                     for g in range(info.size.shape[1])])).all()
    assert mixed_padding


def test_drop_padding_removes_columns_before_layer_zero():
    model = tiny(layers=3)
    x = spectrogram()
    lengths = torch.tensor([33, 50])  # 5 and 7 real columns: 7 kept, column 5-6 of clip 0 invalid
    audio.patch(model, r=0, lengths=lengths, drop_padding=True)
    out = output(model, x)
    info = mmmerge.last_info(model)
    assert info.tokens_per_layer == [2 + BANDS * 7] * 4
    assert audio.patched_layout(model).columns == 7
    # The same computation by hand: embeddings, keep the first 7 columns of every band, layers, head.
    mmmerge.unpatch(model)
    with torch.no_grad():
        base = model.audio_spectrogram_transformer
        h = base.embeddings(x)
        grid = h[:, 2:].reshape(2, BANDS, COLUMNS, -1)[:, :, :7].reshape(2, BANDS * 7, -1)
        h = torch.cat([h[:, :2], grid], dim=1)
        for layer in base.layers:
            h = layer(h, None)
        h = base.layernorm(h)
        manual = model.classifier((h[:, 0] + h[:, 1]) / 2)
    torch.testing.assert_close(out, manual, atol=1e-5, rtol=1e-5)
    # Merging on top: padded columns of clip 0 stay apart from its real ones.
    info = merged_source(model, x, r=4, lengths=lengths, drop_padding=True)
    assert info.tokens_per_layer == [23, 19, 15, 11]
    real = torch.cat([torch.ones(2, dtype=torch.bool), (torch.arange(7) < 5).repeat(BANDS)])
    assert all(len(m) == 1 for m in groups_of(info.source[0], real).values())


def test_lengths_must_match_batch_and_set_lengths_repatches():
    model = tiny()
    audio.patch(model, r=2, lengths=[40, 60, 90], drop_padding=False)
    with pytest.raises(ValueError, match="set_lengths"):
        output(model, spectrogram(2))
    audio.set_lengths(model, [40, 60])
    output(model, spectrogram(2))
    audio.patch(model, r=2, lengths=40, drop_padding=True)
    output(model, spectrogram(2))
    assert mmmerge.last_info(model).tokens_per_layer == [2 + BANDS * 5 - 2 * i for i in range(4)]
    audio.set_lengths(model, 128)
    output(model, spectrogram(2))
    assert mmmerge.last_info(model).tokens_per_layer[0] == TOKENS
    with pytest.raises(ValueError, match="lengths"):
        audio.patch(model, r=2, lengths=[0])
    with pytest.raises(TypeError, match="lengths must be real fbank frame counts"):
        audio.patch(model, r=2, lengths="64")  # not read as [6, 4]
    with pytest.raises(TypeError, match="integer frame counts"):
        audio.patch(model, r=2, lengths=torch.tensor([40.5]))


# ------------------------------------------------------------------------------------ column outputs
def test_column_outputs_unmerge_and_pool_over_bands():
    model = tiny()
    x = spectrogram()
    audio.patch(model, r=0, trace_source=True)
    logits, columns = audio.column_logits(model, x)
    with torch.no_grad():
        hidden = model.audio_spectrogram_transformer(input_values=x).last_hidden_state
    grid = hidden[:, 2:].reshape(2, BANDS, COLUMNS, -1)
    torch.testing.assert_close(audio.band_time_features(model, hidden), grid)
    torch.testing.assert_close(columns, model.classifier(grid.mean(1)))
    torch.testing.assert_close(logits, output(model, x))

    audio.patch(model, r=6, time_mode="adjacent", trace_source=True)
    logits, columns = audio.column_logits(model, x)
    assert logits.shape == (2, 5) and columns.shape == (2, COLUMNS, 5)
    with torch.no_grad():
        hidden = model.audio_spectrogram_transformer(input_values=x).last_hidden_state
    info = mmmerge.last_info(model)
    grid = audio.band_time_features(model, hidden)
    for b in range(2):
        for pos in range(BANDS * COLUMNS):
            assert torch.equal(grid[b, pos // COLUMNS, pos % COLUMNS], hidden[b, info.source[b, pos + 2]])
    torch.testing.assert_close(audio.column_features(model, hidden, pool="max"), grid.amax(1))
    audio.patch(model, r=6)
    with pytest.raises(ValueError, match="trace_source"):
        audio.column_features(model, hidden)


def test_visualize_paints_groups():
    model = tiny()
    x = spectrogram(1)
    audio.patch(model, r=0, trace_source=True)
    output(model, x)
    plain = np.asarray(audio.visualize(x, mmmerge.last_info(model), model=model))
    audio.patch(model, r=4, trace_source=True, lengths=60, drop_padding=True)
    output(model, x)
    merged = audio.visualize(x[0], mmmerge.last_info(model), model=model, scale=1)
    assert plain.shape == (MELS * 2, FRAMES * 2, 3) and merged.size == (FRAMES, MELS)
    merged = np.asarray(merged)
    dropped, kept = merged[:, 8 * STRIDE:].astype(int), merged[:, :8 * STRIDE].astype(int)  # 60 frames: 8 columns
    assert (dropped[..., 0] == dropped[..., 1]).all() and (dropped[..., 1] == dropped[..., 2]).all()  # grey
    assert (kept[..., 0] != kept[..., 1]).mean() > 0.5  # coloured by group
    assert not np.array_equal(plain[::2, ::2], merged)


# ------------------------------------------------------------------------------------- validation
def test_unsupported_model_raises_type_error_untouched():
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=32, patch_size=16)).eval()
    before = copy.deepcopy(vit.state_dict())
    for fn in (audio.patch, mmmerge.patch):
        with pytest.raises(TypeError, match="AST"):
            fn(vit, r=2)
    assert untouched(vit)
    assert all(torch.equal(v, before[k]) for k, v in vit.state_dict().items())


def test_infeasible_r_raises_before_modifying():
    model = tiny()
    x = spectrogram()
    reference = output(model, x)
    with pytest.raises(ValueError, match="infeasible"):
        audio.patch(model, r=30)
    assert untouched(model)
    assert torch.equal(output(model, x), reference)
    audio.patch(model, r=3)
    with pytest.raises(ValueError, match="infeasible"):
        audio.patch(model, r=3, lengths=10, drop_padding=True)  # one column left: 3 tokens cannot lose 3 per layer
    output(model, x)
    assert mmmerge.last_info(model).tokens_per_layer == [47, 44, 41, 38]  # the old patch is still in force


def test_target_flops_reaches_its_fraction():
    model = tiny()
    x = spectrogram()
    base = mmmerge.count_flops(model, input_values=x)
    audio.patch(model, r=TargetFlops(0.7), time_mode="adjacent")
    merged = mmmerge.count_flops(model, input_values=x)
    # The count includes the engine's own products (similarities, the merged slots' mixing), which the
    # schedule's layer model leaves out: a few percent on this width-32 model, about 1% at base width.
    assert 0.45 < merged / base <= 0.78


# ------------------------------------------------------------------------------------ features / I/O
def tone(seconds: float, rate: int = 16000, seed: int = 0) -> torch.Tensor:
    t = torch.arange(int(seconds * rate)) / rate
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    return (0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.05 * noise).float()


def test_features_match_ast_feature_extractor():
    extractor = ASTFeatureExtractor()
    clips = [tone(0.7), tone(2.0, seed=1), tone(11.0, seed=2)]  # short, medium, longer than 1024 frames
    values, lengths = audio.features(clips)
    reference = extractor([c.numpy() for c in clips], sampling_rate=16000, return_tensors="pt").input_values
    assert values.shape == (3, 1024, 128)
    torch.testing.assert_close(values, reference, atol=1e-4, rtol=0)
    assert lengths.tolist() == [68, 198, 1024]  # 1 + (S - 400) // 160 frames, cut at 1024
    one, length = audio.features(clips[0])
    torch.testing.assert_close(one, reference[:1], atol=1e-4, rtol=0)
    assert length.tolist() == [68]
    with pytest.raises(ValueError, match="mono"):
        audio.features([torch.zeros(2, 16000)])


def test_load_audio_reads_resamples_and_mixes(tmp_path):
    import torchaudio.functional as AF

    wave = tone(0.5).numpy()
    sf.write(tmp_path / "a.wav", wave, 16000, subtype="FLOAT")
    loaded, rate = audio.load_audio(tmp_path / "a.wav")
    assert rate == 16000 and loaded.dtype == torch.float32
    np.testing.assert_allclose(loaded.numpy(), wave, atol=1e-7)

    low = tone(0.5, rate=8000, seed=3).numpy()
    stereo = np.stack([low, 0.5 * low], axis=1)  # [S, 2]
    sf.write(tmp_path / "b.flac", stereo, 8000)
    loaded, rate = audio.load_audio(tmp_path / "b.flac")
    assert rate == 16000 and loaded.shape == (8000,)
    mixed = torch.from_numpy(sf.read(tmp_path / "b.flac", dtype="float32")[0].mean(1))
    torch.testing.assert_close(loaded, AF.resample(mixed, 8000, 16000))
    both, rate = audio.load_audio(tmp_path / "b.flac", sample_rate=None, mono=False)
    assert rate == 8000 and both.shape == (2, 4000)

    if "OGG" in sf.available_formats():
        sf.write(tmp_path / "c.ogg", wave, 16000, format="OGG", subtype="VORBIS")
        loaded, rate = audio.load_audio(tmp_path / "c.ogg")
        assert rate == 16000 and abs(loaded.shape[0] - wave.shape[0]) < 1000


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no audio file"):
        audio.load_audio(tmp_path / "missing.wav")
    (tmp_path / "text.wav").write_text("this is not audio")
    with pytest.raises(ValueError, match="could not read"):
        audio.load_audio(tmp_path / "text.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="no audio samples"):
        audio.load_audio(tmp_path / "empty.wav")


def test_merged_tokens_carry_band_and_time_spans_in_columns_and_seconds():
    model = tiny(layers=4)
    info = merged_source(model, spectrogram(), r=6, time_mode="adjacent")
    coords = info.state.coords
    band, column = original("f"), original("t")
    checked = 0
    for b in range(2):
        for g in range(2, info.size.shape[1]):
            members = (info.source[b] == g).nonzero().flatten()
            t, f = column[members], band[members]
            assert (coords["t_min"][b, g], coords["t_max"][b, g]) == (t.min(), t.max())
            assert (coords["f_min"][b, g], coords["f_max"][b, g]) == (f.min(), f.max())
            assert float(coords["sec_min"][b, g]) == pytest.approx(float(t.min()) * STRIDE * 0.01)
            assert float(coords["sec_max"][b, g]) == pytest.approx((float(t.max()) * STRIDE + PATCH) * 0.01)
            checked += len(members) > 1
    assert checked > 0
    seconds = audio.ast_layout(model, columns=4).column_seconds()
    torch.testing.assert_close(seconds, torch.tensor([[0.0, 0.16], [0.08, 0.24], [0.16, 0.32], [0.24, 0.40]]))


def test_load_audio_zero_byte_file_and_bad_rate(tmp_path):
    (tmp_path / "zero.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        audio.load_audio(tmp_path / "zero.wav")
    sf.write(tmp_path / "a.wav", tone(0.1).numpy(), 16000)
    with pytest.raises(ValueError, match="sample_rate"):
        audio.load_audio(tmp_path / "a.wav", sample_rate=0)
    with pytest.raises(ValueError, match="sample_rate"):
        audio.features(tone(0.1), sample_rate=-16000)


def test_features_accept_numpy_and_resample_other_rates():
    clip = tone(1.0)
    values, lengths = audio.features(clip.numpy())
    torch.testing.assert_close(values, audio.features(clip)[0])
    batch, batch_lengths = audio.features([clip.numpy(), tone(1.0, seed=1).numpy()])
    assert batch.shape == (2, 1024, 128) and batch_lengths.tolist() == [98, 98]
    many, _ = audio.features(torch.stack([tone(0.1, seed=i) for i in range(9)]).numpy())  # [9, S]: a batch
    torch.testing.assert_close(many[1], audio.features(tone(0.1, seed=1))[0][0])
    import torchaudio.functional as AF

    low = tone(1.0, rate=8000)
    resampled, length = audio.features(low, sample_rate=8000)
    torch.testing.assert_close(resampled, audio.features(AF.resample(low, 8000, 16000))[0])
    assert length.tolist() == [98]
    with pytest.raises(ValueError, match="no clips"):
        audio.features([])


def test_real_lengths_read_padding_off_feature_extractor_output():
    extractor = ASTFeatureExtractor()
    clips = [tone(0.7), tone(2.0, seed=1), tone(11.0, seed=2), torch.zeros(8000)]  # silence is not padding
    reference = extractor([c.numpy() for c in clips], sampling_rate=16000, return_tensors="pt").input_values
    _, lengths = audio.features(clips)
    assert audio.real_lengths(reference).tolist() == lengths.tolist() == [68, 198, 1024, 48]
    assert audio.real_lengths(reference[0]).tolist() == [68]
    raw, raw_lengths = audio.features(clips[:2], normalize=False)
    assert audio.real_lengths(raw, normalized=False).tolist() == raw_lengths.tolist()
    with pytest.raises(ValueError, match="input_values"):
        audio.real_lengths(torch.zeros(5))


# ------------------------------------------------------------------------------- what must not pass silently
def test_features_refuse_ambiguous_non_finite_and_integer_scaled_audio():
    left, right = tone(1.0), 0.5 * tone(1.0, seed=1)
    stereo = torch.stack([left, right])  # [2, S]: torchaudio's [channels, S], or a batch of 2?
    with pytest.raises(ValueError, match=r"\[2, 16000\] is ambiguous: 2 channels .* wave.mean\(0\) .* a list"):
        audio.features(stereo)
    with pytest.raises(ValueError, match="ambiguous"):
        audio.features(stereo.numpy())
    # Each advice works: mixed down it is one clip, as a list a batch of two.
    mono, length = audio.features(stereo.mean(0))
    assert mono.shape == (1, 1024, 128) and length.tolist() == [98]
    assert audio.features([c for c in stereo])[0].shape == (2, 1024, 128)
    assert audio.features(stereo[:1])[0].shape == (1, 1024, 128)  # one row is one clip either way
    for bad in (float("nan"), float("inf")):
        broken = left.clone()
        broken[100] = bad
        with pytest.raises(ValueError, match=r"clip 1 holds 1 NaN or inf sample\(s\) of 16000"):
            audio.features([left, broken])
    with pytest.raises(ValueError, match="NaN or inf"):
        audio.tag_windows(tagger_for_checks(), torch.full((20000,), float("nan")))
    loud = left * 32767  # int16 sample values in a float tensor
    with pytest.raises(ValueError, match=r"waveform is float audio with peak \d+.*must lie in \[-1, 1\] \(it looks like int16 PCM stored as "
                                         r"float: divide by 32768"):
        audio.features(loud)
    torch.testing.assert_close(audio.features(loud / 32768)[0], audio.features(left)[0], atol=1e-3, rtol=0)
    audio.features(1.5 * left / left.abs().max())  # a little over full scale is still audio


def tagger_for_checks():
    model = tiny()
    audio.patch(model, r=0, trace_source=True)
    return model


def test_a_patched_ast_refuses_input_values_of_another_shape_naming_both():
    model = tiny()  # 128 frames x 32 mel bins, not AST-base
    x, lengths = audio.features(tone(0.5))  # AST-base's defaults: [1, 1024, 128]
    with pytest.raises(ValueError, match=r"lengths: .*window of 128 frames.*num_mel_bins=32, max_length=128"):
        audio.patch(model, r=2, lengths=[200])
    audio.patch(model, r=2, lengths=lengths)  # 48 frames: fits
    message = (r"input_values of shape \[1, 1024, 128\] do not fit this AST: it takes \[B, 128, 32\] "
               r"\(config.max_length=128 frames, config.num_mel_bins=32\); make them with audio.features\(waveform, "
               r"rate, num_mel_bins=32, max_length=128\)")
    with pytest.raises(ValueError, match=message):
        model(input_values=x)
    with pytest.raises(ValueError, match=message.replace("of shape", "of shape")):
        audio.column_logits(audio.patch(model, r=2, trace_source=True), x)
    x, lengths = audio.features(tone(0.5), num_mel_bins=MELS, max_length=FRAMES)  # the advice
    audio.patch(model, r=2, lengths=lengths)
    assert model(input_values=x).logits.shape == (1, 5)
    # The check travels with copies and goes with unpatch (of that copy only).
    twin = copy.deepcopy(model)
    with pytest.raises(ValueError, match="do not fit this AST"):
        twin(input_values=spectrogram()[:, :, :16])
    mmmerge.unpatch(twin)
    assert untouched(twin) and not twin.audio_spectrogram_transformer.embeddings._forward_pre_hooks
    with pytest.raises(ValueError, match="do not fit this AST"):
        model(input_values=spectrogram()[:, :64])
    mmmerge.unpatch(model)
    assert untouched(model)


def test_lengths_are_frame_counts_within_the_models_window():
    model = tiny()
    for bad in (1.5, [40, 1.5], "64", True, {"a": 1}):
        with pytest.raises(TypeError, match=r"lengths must be real fbank frame counts: an int, or one int per clip"):
            audio.patch(model, r=2, lengths=bad)
        assert untouched(model)
    with pytest.raises(ValueError, match=r"lengths: 10000 frames is longer than this model's window of 128 frames "
                                         r"\(1.28 s, config.max_length\)"):
        audio.patch(model, r=2, lengths=[10000])
    with pytest.raises(ValueError, match="got none"):
        audio.patch(model, r=2, lengths=[])
    assert untouched(model)
    audio.patch(model, r=2, lengths=np.array([40, 128]))  # numpy ints are frame counts too
    assert audio.patched_layout(model).columns == COLUMNS


def test_padding_is_kept_by_default_so_r0_is_the_unpatched_model():
    model = tiny()
    x = spectrogram(3)
    reference = output(model, x)
    lengths = [40, 90, 128]
    audio.patch(model, r=0, lengths=lengths)  # padding kept (invalid): exactly what transformers runs
    assert torch.equal(output(model, x), reference)
    assert mmmerge.last_info(model).tokens_per_layer == [TOKENS] * 4
    audio.patch(model, r=0, lengths=lengths, drop_padding=True)  # opt-in: fewer tokens, other outputs
    assert mmmerge.last_info(model).tokens_per_layer[0] == TOKENS  # the longest clip is whole: nothing to drop
    audio.patch(model, r=0, lengths=[40, 60, 90], drop_padding=True)
    dropped = output(model, x)
    assert mmmerge.last_info(model).tokens_per_layer[0] == 2 + BANDS * 12 and not torch.allclose(dropped, reference)
