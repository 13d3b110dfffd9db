"""Property tests: no forbidden pair ever lands in one group, for every matcher and constraint."""
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import mmmerge as mm

METHODS = ["tome", "pitome", "tps", "random", "prune"]


def video_state(B, T, S, protected, band_major=False):
    """T frames of S tokens, time-major; band f = index in frame // 2. ``band_major``: the tokens sorted by band
    first (the order a band rule assumes, as the audio adapter builds it)."""
    t = (torch.arange(T * S) // S).float()
    f = (torch.arange(T * S) % S).float() // 2
    if band_major:
        order = torch.argsort(f * T + t, stable=True)
        t, f = t[order], f[order]
    head = torch.full((protected,), -10.0)
    t, f = torch.cat([head, t]), torch.cat([head, f])
    return mm.init_state(B, protected + T * S, protected=protected,
                         coords={"t_min": t, "t_max": t, "f_min": f, "f_max": f},
                         rules={"t_min": "min", "t_max": "max", "f_min": "min", "f_max": "max"})


def rule(constraint, T, S):
    return mm.parse_constraint(constraint, steps={"t": T, "f": (S + 1) // 2})


def groups_of(state, b):
    src = state.source[b]
    return [torch.nonzero(src == j).flatten() for j in range(state.num_tokens)]


def check_groups(constraint, state0, state, protected):
    t0 = state0.coords["t_min"][0]
    f0 = state0.coords["f_min"][0]
    for b in range(state.batch_size):
        for members in groups_of(state, b):
            if (members < protected).any():
                assert len(members) == 1, "a protected token was merged"
                continue
            times = t0[members].unique()
            if constraint == "within_frame":
                assert len(times) == 1
            elif constraint == "same_band":
                assert len(f0[members].unique()) == 1
            elif constraint == "adjacent":
                assert times.max() - times.min() + 1 == len(times), f"gap in span {times.tolist()}"
            elif constraint.startswith("window"):
                k = int(constraint[7:-1])
                assert len((times // k).unique()) == 1 and times.max() - times.min() < k


@pytest.mark.parametrize("method", METHODS)  # one property test per matcher
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    constraint=st.sampled_from(["within_frame", "adjacent", "window(2)", "window(3)", "same_band"]),
    T=st.integers(2, 6), S=st.integers(4, 12), protected=st.integers(0, 2),
    frac=st.floats(0.2, 0.9), seed=st.integers(0, 10_000),
)
def test_no_forbidden_pair_ever_merges(method, constraint, T, S, protected, frac, seed):
    torch.manual_seed(seed)
    state0 = video_state(2, T, S, protected, band_major=constraint == "same_band")
    N = state0.num_tokens
    x = torch.randn(2, N, 8)
    keep = max(protected + 1, int(N * frac))
    try:
        _, state = mm.reduce_tokens(x, keep=keep, method=method, constraint=rule(constraint, T, S), state=state0)
    except ValueError as err:  # refused up front when no step can reach keep under this rule
        assert "out of reach" in str(err)
        assume(False)
    check_groups(constraint, state0, state, protected)
    # The merged spans agree with the members (spans are min/max of the originals).
    t0 = state0.coords["t_min"]
    for b in range(2):
        for j, members in enumerate(groups_of(state, b)):
            assert state.coords["t_min"][b, j] == t0[b, members].min()
            assert state.coords["t_max"][b, j] == t0[b, members].max()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("constraint", ["within_frame", "adjacent", "window(2)", "same_band"])
def test_typical_reduction_is_feasible(method, constraint):
    torch.manual_seed(0)
    state0 = video_state(2, 4, 16, 1, band_major=constraint == "same_band")
    x = torch.randn(2, state0.num_tokens, 8)
    _, state = mm.reduce_tokens(x, keep=33, method=method, constraint=rule(constraint, 4, 16), state=state0)
    assert state.num_tokens == 33
    check_groups(constraint, state0, state, 1)


def test_padding_never_merges_with_real_tokens():
    torch.manual_seed(0)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, 20:] = False
    valid[1, 11:] = False
    for method in METHODS:
        state0 = mm.init_state(2, 30, valid=valid)
        _, state = mm.reduce_tokens(torch.randn(2, 30, 8), keep=12, method=method, state=state0)
        for b in range(2):
            for j in range(12):
                members = state.source[b] == j
                assert valid[b][members].all() or (~valid[b][members]).all()
            assert state.valid[b].sum() >= 1


def test_parse_constraint_names():
    assert mm.parse_constraint(None).name == "global"
    assert mm.parse_constraint("window(4)").k == 4
    assert mm.parse_constraint("same_band").axis == "f"
    with pytest.raises(ValueError, match="positive integer"):
        mm.Window(k=0)


def test_tokens_out_of_the_rules_order_are_refused_by_the_checked_entry_points():
    """The guarantees assume time-major tokens; plan_merge / reduce_tokens check it (adapters opt out)."""
    frames, per_frame = 4, 4
    sorted_t = torch.arange(frames).float().repeat_interleave(per_frame)  # t = 0 0 0 0 1 1 1 1 ...
    rule = mm.parse_constraint("adjacent", steps={"t": frames})
    x = torch.randn(1, frames * per_frame, 8)

    def state(t):
        return mm.init_state(1, len(t), coords={"t_min": t, "t_max": t}, rules={"t_min": "min", "t_max": "max"},
                             trace_source=True)

    mm.plan_merge(x, state(sorted_t), r=4, constraint=rule)
    interleaved = torch.arange(frames).float().repeat(per_frame)  # t = 0 1 2 3 0 1 2 3 ...
    with pytest.raises(ValueError, match="runs of neighbours that may merge.*sort the tokens"):
        mm.plan_merge(x, state(interleaved), r=4, constraint=rule)
    with pytest.raises(ValueError, match="runs of neighbours that may merge"):
        mm.reduce_tokens(x, keep=12, constraint=rule, state=state(interleaved))
    mm.plan_merge(x, state(interleaved), r=1, constraint=rule, check_layout=False)  # the caller vouches


def test_equal_groups_count_the_padding_runs_of_each_group():
    """plan_merge(groups=int) with padding: each group's guarantee counts its padding/real changes (a loop
    reference), and the merge that uses them keeps padding and real tokens apart."""
    from mmmerge.reduce import equal_groups

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        B, M = 3, int(torch.randint(2, 30, (), generator=g))
        valid = torch.rand(B, M, generator=g) > 0.4
        valid[:, 0] = True
        groups = int(torch.randint(1, M + 1, (), generator=g))
        part = equal_groups(mm.init_state(B, M, valid=valid), groups, 0, "tome")
        start, expected = 0, []
        for n in part.sizes:
            seg = valid[:, start:start + n]
            expected.append(1 + int((seg[:, 1:] != seg[:, :-1]).sum(1).max()) if n > 1 else 1)
            start += n
        assert [gu.runs for gu in part.guarantees] == expected
    valid = torch.tensor([[True] * 6 + [False] * 2 + [True] * 4])
    state = mm.init_state(1, 12, valid=valid, trace_source=True)
    plan = mm.plan_merge(torch.randn(1, 12, 8, generator=g), state, r=3, groups=2)
    _, merged = mm.merge_tokens(torch.randn(1, 12, 8, generator=g), state, plan)
    for token in range(merged.size.shape[1]):
        assert len(set(valid[0, merged.source[0] == token].tolist())) == 1


# ------------------------------------------------------------------------ guarantees: one home, in the engine
# What plan_layout gave before its guarantees moved into the engine (static_guarantee / group_guarantee), from
# its hand-written formulas (pad = int(padded), F bands, T steps, blocks = ceil(T / k)):
#   global + padding (1 + pad, 1 + pad); within_frame: frames (1, 1) each, or (T, T) without budgets (padding
#   adds nothing); same_band: bands (1 + pad, 1 + pad) each, or F * (1 + pad) runs and cliques; adjacent
#   (ceil(T/2) + pad, T), within_band per band (runs, T) with runs = 1 + pad for one token per band and step,
#   else ceil(T/2) + pad, and F * runs, F * T without budgets; window(k): blocks (1 + pad, 1 + pad) each, or
#   (blocks + pad, blocks + pad), F times that within_band without budgets.
# Columns: grid, mode, k, budget, within_band, padded, group sizes, runs, cliques, rule, carried axes.
LAYOUT_GRIDS = {
    "video_4x6": ((1, (("t", 4), ("row", 2), ("col", 3))), None),
    "video_5x4": ((1, (("t", 5), ("row", 2), ("col", 2))), None),
    "video_8x1": ((0, (("t", 8), ("row", 1), ("col", 1))), None),
    "audio_3x7": ((2, (("f", 3), ("t", 7))), "f"),
    "audio_2x5x2": ((1, (("f", 2), ("t", 5), ("x", 2))), "f"),  # two tokens per band and step
}
OLD_LAYOUTS = [
    ('video_4x6', 'global', 1, True, False, False, (), 1, 1, 'global', ()),
    ('video_4x6', 'global', 1, True, False, True, (), 2, 2, 'global', ()),
    ('video_4x6', 'global', 1, False, False, False, (), 1, 1, 'global', ()),
    ('video_4x6', 'global', 1, False, False, True, (), 2, 2, 'global', ()),
    ('video_4x6', 'within_frame', 1, True, False, False, (6, 6, 6, 6), 1, 1, 'global', ()),
    ('video_4x6', 'within_frame', 1, True, False, True, (6, 6, 6, 6), 1, 1, 'global', ()),
    ('video_4x6', 'within_frame', 1, False, False, False, (), 4, 4, 'within_frame', ('t',)),
    ('video_4x6', 'within_frame', 1, False, False, True, (), 4, 4, 'within_frame', ('t',)),
    ('video_4x6', 'adjacent', 1, True, False, False, (), 2, 4, 'adjacent', ('t',)),
    ('video_4x6', 'adjacent', 1, True, False, True, (), 3, 4, 'adjacent', ('t',)),
    ('video_4x6', 'adjacent', 1, False, False, False, (), 2, 4, 'adjacent', ('t',)),
    ('video_4x6', 'adjacent', 1, False, False, True, (), 3, 4, 'adjacent', ('t',)),
    ('video_4x6', 'window', 1, True, False, False, (6, 6, 6, 6), 1, 1, 'global', ()),
    ('video_4x6', 'window', 1, True, False, True, (6, 6, 6, 6), 2, 2, 'global', ()),
    ('video_4x6', 'window', 1, False, False, False, (), 4, 4, 'window(1)', ('t',)),
    ('video_4x6', 'window', 1, False, False, True, (), 5, 5, 'window(1)', ('t',)),
    ('video_4x6', 'window', 2, True, False, False, (12, 12), 1, 1, 'global', ()),
    ('video_4x6', 'window', 2, True, False, True, (12, 12), 2, 2, 'global', ()),
    ('video_4x6', 'window', 2, False, False, False, (), 2, 2, 'window(2)', ('t',)),
    ('video_4x6', 'window', 2, False, False, True, (), 3, 3, 'window(2)', ('t',)),
    ('video_4x6', 'window', 3, True, False, False, (18, 6), 1, 1, 'global', ()),
    ('video_4x6', 'window', 3, True, False, True, (18, 6), 2, 2, 'global', ()),
    ('video_4x6', 'window', 3, False, False, False, (), 2, 2, 'window(3)', ('t',)),
    ('video_4x6', 'window', 3, False, False, True, (), 3, 3, 'window(3)', ('t',)),
    ('video_5x4', 'global', 1, True, False, False, (), 1, 1, 'global', ()),
    ('video_5x4', 'global', 1, True, False, True, (), 2, 2, 'global', ()),
    ('video_5x4', 'global', 1, False, False, False, (), 1, 1, 'global', ()),
    ('video_5x4', 'global', 1, False, False, True, (), 2, 2, 'global', ()),
    ('video_5x4', 'within_frame', 1, True, False, False, (4, 4, 4, 4, 4), 1, 1, 'global', ()),
    ('video_5x4', 'within_frame', 1, True, False, True, (4, 4, 4, 4, 4), 1, 1, 'global', ()),
    ('video_5x4', 'within_frame', 1, False, False, False, (), 5, 5, 'within_frame', ('t',)),
    ('video_5x4', 'within_frame', 1, False, False, True, (), 5, 5, 'within_frame', ('t',)),
    ('video_5x4', 'adjacent', 1, True, False, False, (), 3, 5, 'adjacent', ('t',)),
    ('video_5x4', 'adjacent', 1, True, False, True, (), 4, 5, 'adjacent', ('t',)),
    ('video_5x4', 'adjacent', 1, False, False, False, (), 3, 5, 'adjacent', ('t',)),
    ('video_5x4', 'adjacent', 1, False, False, True, (), 4, 5, 'adjacent', ('t',)),
    ('video_5x4', 'window', 1, True, False, False, (4, 4, 4, 4, 4), 1, 1, 'global', ()),
    ('video_5x4', 'window', 1, True, False, True, (4, 4, 4, 4, 4), 2, 2, 'global', ()),
    ('video_5x4', 'window', 1, False, False, False, (), 5, 5, 'window(1)', ('t',)),
    ('video_5x4', 'window', 1, False, False, True, (), 6, 6, 'window(1)', ('t',)),
    ('video_5x4', 'window', 2, True, False, False, (8, 8, 4), 1, 1, 'global', ()),
    ('video_5x4', 'window', 2, True, False, True, (8, 8, 4), 2, 2, 'global', ()),
    ('video_5x4', 'window', 2, False, False, False, (), 3, 3, 'window(2)', ('t',)),
    ('video_5x4', 'window', 2, False, False, True, (), 4, 4, 'window(2)', ('t',)),
    ('video_5x4', 'window', 3, True, False, False, (12, 8), 1, 1, 'global', ()),
    ('video_5x4', 'window', 3, True, False, True, (12, 8), 2, 2, 'global', ()),
    ('video_5x4', 'window', 3, False, False, False, (), 2, 2, 'window(3)', ('t',)),
    ('video_5x4', 'window', 3, False, False, True, (), 3, 3, 'window(3)', ('t',)),
    ('video_8x1', 'global', 1, True, False, False, (), 1, 1, 'global', ()),
    ('video_8x1', 'global', 1, True, False, True, (), 2, 2, 'global', ()),
    ('video_8x1', 'global', 1, False, False, False, (), 1, 1, 'global', ()),
    ('video_8x1', 'global', 1, False, False, True, (), 2, 2, 'global', ()),
    ('video_8x1', 'within_frame', 1, True, False, False, (1, 1, 1, 1, 1, 1, 1, 1), 1, 1, 'global', ()),
    ('video_8x1', 'within_frame', 1, True, False, True, (1, 1, 1, 1, 1, 1, 1, 1), 1, 1, 'global', ()),
    ('video_8x1', 'within_frame', 1, False, False, False, (), 8, 8, 'within_frame', ('t',)),
    ('video_8x1', 'within_frame', 1, False, False, True, (), 8, 8, 'within_frame', ('t',)),
    ('video_8x1', 'adjacent', 1, True, False, False, (), 4, 8, 'adjacent', ('t',)),
    ('video_8x1', 'adjacent', 1, True, False, True, (), 5, 8, 'adjacent', ('t',)),
    ('video_8x1', 'adjacent', 1, False, False, False, (), 4, 8, 'adjacent', ('t',)),
    ('video_8x1', 'adjacent', 1, False, False, True, (), 5, 8, 'adjacent', ('t',)),
    ('video_8x1', 'window', 1, True, False, False, (1, 1, 1, 1, 1, 1, 1, 1), 1, 1, 'global', ()),
    ('video_8x1', 'window', 1, True, False, True, (1, 1, 1, 1, 1, 1, 1, 1), 2, 2, 'global', ()),
    ('video_8x1', 'window', 1, False, False, False, (), 8, 8, 'window(1)', ('t',)),
    ('video_8x1', 'window', 1, False, False, True, (), 9, 9, 'window(1)', ('t',)),
    ('video_8x1', 'window', 2, True, False, False, (2, 2, 2, 2), 1, 1, 'global', ()),
    ('video_8x1', 'window', 2, True, False, True, (2, 2, 2, 2), 2, 2, 'global', ()),
    ('video_8x1', 'window', 2, False, False, False, (), 4, 4, 'window(2)', ('t',)),
    ('video_8x1', 'window', 2, False, False, True, (), 5, 5, 'window(2)', ('t',)),
    ('video_8x1', 'window', 3, True, False, False, (3, 3, 2), 1, 1, 'global', ()),
    ('video_8x1', 'window', 3, True, False, True, (3, 3, 2), 2, 2, 'global', ()),
    ('video_8x1', 'window', 3, False, False, False, (), 3, 3, 'window(3)', ('t',)),
    ('video_8x1', 'window', 3, False, False, True, (), 4, 4, 'window(3)', ('t',)),
    ('audio_3x7', 'global', 1, True, False, False, (), 1, 1, 'global', ()),
    ('audio_3x7', 'global', 1, True, False, True, (), 2, 2, 'global', ()),
    ('audio_3x7', 'global', 1, True, True, False, (7, 7, 7), 1, 1, 'global', ()),
    ('audio_3x7', 'global', 1, True, True, True, (7, 7, 7), 2, 2, 'global', ()),
    ('audio_3x7', 'global', 1, False, False, False, (), 1, 1, 'global', ()),
    ('audio_3x7', 'global', 1, False, False, True, (), 2, 2, 'global', ()),
    ('audio_3x7', 'global', 1, False, True, False, (), 3, 3, 'same_band', ('f',)),
    ('audio_3x7', 'global', 1, False, True, True, (), 6, 6, 'same_band', ('f',)),
    ('audio_3x7', 'same_band', 1, True, False, False, (7, 7, 7), 1, 1, 'global', ()),
    ('audio_3x7', 'same_band', 1, True, False, True, (7, 7, 7), 2, 2, 'global', ()),
    ('audio_3x7', 'same_band', 1, True, True, False, (7, 7, 7), 1, 1, 'global', ()),
    ('audio_3x7', 'same_band', 1, True, True, True, (7, 7, 7), 2, 2, 'global', ()),
    ('audio_3x7', 'same_band', 1, False, False, False, (), 3, 3, 'same_band', ('f',)),
    ('audio_3x7', 'same_band', 1, False, False, True, (), 6, 6, 'same_band', ('f',)),
    ('audio_3x7', 'same_band', 1, False, True, False, (), 3, 3, 'same_band', ('f',)),
    ('audio_3x7', 'same_band', 1, False, True, True, (), 6, 6, 'same_band', ('f',)),
    ('audio_3x7', 'adjacent', 1, True, False, False, (), 4, 7, 'adjacent', ('t',)),
    ('audio_3x7', 'adjacent', 1, True, False, True, (), 5, 7, 'adjacent', ('t',)),
    ('audio_3x7', 'adjacent', 1, True, True, False, (7, 7, 7), 1, 7, 'adjacent', ('t',)),
    ('audio_3x7', 'adjacent', 1, True, True, True, (7, 7, 7), 2, 7, 'adjacent', ('t',)),
    ('audio_3x7', 'adjacent', 1, False, False, False, (), 4, 7, 'adjacent', ('t',)),
    ('audio_3x7', 'adjacent', 1, False, False, True, (), 5, 7, 'adjacent', ('t',)),
    ('audio_3x7', 'adjacent', 1, False, True, False, (), 3, 21, 'same_band+adjacent', ('f', 't')),
    ('audio_3x7', 'adjacent', 1, False, True, True, (), 6, 21, 'same_band+adjacent', ('f', 't')),
    ('audio_3x7', 'window', 1, True, False, False, (3, 3, 3, 3, 3, 3, 3), 1, 1, 'global', ()),
    ('audio_3x7', 'window', 1, True, False, True, (3, 3, 3, 3, 3, 3, 3), 2, 2, 'global', ()),
    ('audio_3x7', 'window', 1, True, True, False, (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1), 1, 1, 'global', ()),
    ('audio_3x7', 'window', 1, True, True, True, (1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1), 2, 2, 'global', ()),
    ('audio_3x7', 'window', 1, False, False, False, (), 7, 7, 'window(1)', ('t',)),
    ('audio_3x7', 'window', 1, False, False, True, (), 8, 8, 'window(1)', ('t',)),
    ('audio_3x7', 'window', 1, False, True, False, (), 21, 21, 'same_band+window(1)', ('f', 't')),
    ('audio_3x7', 'window', 1, False, True, True, (), 24, 24, 'same_band+window(1)', ('f', 't')),
    ('audio_3x7', 'window', 2, True, False, False, (6, 6, 6, 3), 1, 1, 'global', ()),
    ('audio_3x7', 'window', 2, True, False, True, (6, 6, 6, 3), 2, 2, 'global', ()),
    ('audio_3x7', 'window', 2, True, True, False, (2, 2, 2, 1, 2, 2, 2, 1, 2, 2, 2, 1), 1, 1, 'global', ()),
    ('audio_3x7', 'window', 2, True, True, True, (2, 2, 2, 1, 2, 2, 2, 1, 2, 2, 2, 1), 2, 2, 'global', ()),
    ('audio_3x7', 'window', 2, False, False, False, (), 4, 4, 'window(2)', ('t',)),
    ('audio_3x7', 'window', 2, False, False, True, (), 5, 5, 'window(2)', ('t',)),
    ('audio_3x7', 'window', 2, False, True, False, (), 12, 12, 'same_band+window(2)', ('f', 't')),
    ('audio_3x7', 'window', 2, False, True, True, (), 15, 15, 'same_band+window(2)', ('f', 't')),
    ('audio_3x7', 'window', 3, True, False, False, (9, 9, 3), 1, 1, 'global', ()),
    ('audio_3x7', 'window', 3, True, False, True, (9, 9, 3), 2, 2, 'global', ()),
    ('audio_3x7', 'window', 3, True, True, False, (3, 3, 1, 3, 3, 1, 3, 3, 1), 1, 1, 'global', ()),
    ('audio_3x7', 'window', 3, True, True, True, (3, 3, 1, 3, 3, 1, 3, 3, 1), 2, 2, 'global', ()),
    ('audio_3x7', 'window', 3, False, False, False, (), 3, 3, 'window(3)', ('t',)),
    ('audio_3x7', 'window', 3, False, False, True, (), 4, 4, 'window(3)', ('t',)),
    ('audio_3x7', 'window', 3, False, True, False, (), 9, 9, 'same_band+window(3)', ('f', 't')),
    ('audio_3x7', 'window', 3, False, True, True, (), 12, 12, 'same_band+window(3)', ('f', 't')),
    ('audio_2x5x2', 'global', 1, True, False, False, (), 1, 1, 'global', ()),
    ('audio_2x5x2', 'global', 1, True, False, True, (), 2, 2, 'global', ()),
    ('audio_2x5x2', 'global', 1, True, True, False, (5, 5), 1, 1, 'global', ()),
    ('audio_2x5x2', 'global', 1, True, True, True, (5, 5), 2, 2, 'global', ()),
    ('audio_2x5x2', 'global', 1, False, False, False, (), 1, 1, 'global', ()),
    ('audio_2x5x2', 'global', 1, False, False, True, (), 2, 2, 'global', ()),
    ('audio_2x5x2', 'global', 1, False, True, False, (), 2, 2, 'same_band', ('f',)),
    ('audio_2x5x2', 'global', 1, False, True, True, (), 4, 4, 'same_band', ('f',)),
    ('audio_2x5x2', 'same_band', 1, True, False, False, (5, 5), 1, 1, 'global', ()),
    ('audio_2x5x2', 'same_band', 1, True, False, True, (5, 5), 2, 2, 'global', ()),
    ('audio_2x5x2', 'same_band', 1, True, True, False, (5, 5), 1, 1, 'global', ()),
    ('audio_2x5x2', 'same_band', 1, True, True, True, (5, 5), 2, 2, 'global', ()),
    ('audio_2x5x2', 'same_band', 1, False, False, False, (), 2, 2, 'same_band', ('f',)),
    ('audio_2x5x2', 'same_band', 1, False, False, True, (), 4, 4, 'same_band', ('f',)),
    ('audio_2x5x2', 'same_band', 1, False, True, False, (), 2, 2, 'same_band', ('f',)),
    ('audio_2x5x2', 'same_band', 1, False, True, True, (), 4, 4, 'same_band', ('f',)),
    ('audio_2x5x2', 'adjacent', 1, True, False, False, (), 3, 5, 'adjacent', ('t',)),
    ('audio_2x5x2', 'adjacent', 1, True, False, True, (), 4, 5, 'adjacent', ('t',)),
    ('audio_2x5x2', 'adjacent', 1, True, True, False, (10, 10), 3, 5, 'adjacent', ('t',)),
    ('audio_2x5x2', 'adjacent', 1, True, True, True, (10, 10), 4, 5, 'adjacent', ('t',)),
    ('audio_2x5x2', 'adjacent', 1, False, False, False, (), 3, 5, 'adjacent', ('t',)),
    ('audio_2x5x2', 'adjacent', 1, False, False, True, (), 4, 5, 'adjacent', ('t',)),
    ('audio_2x5x2', 'adjacent', 1, False, True, False, (), 6, 10, 'same_band+adjacent', ('f', 't')),
    ('audio_2x5x2', 'adjacent', 1, False, True, True, (), 8, 10, 'same_band+adjacent', ('f', 't')),
    ('audio_2x5x2', 'window', 1, True, False, False, (4, 4, 4, 4, 4), 1, 1, 'global', ()),
    ('audio_2x5x2', 'window', 1, True, False, True, (4, 4, 4, 4, 4), 2, 2, 'global', ()),
    ('audio_2x5x2', 'window', 1, True, True, False, (2, 2, 2, 2, 2, 2, 2, 2, 2, 2), 1, 1, 'global', ()),
    ('audio_2x5x2', 'window', 1, True, True, True, (2, 2, 2, 2, 2, 2, 2, 2, 2, 2), 2, 2, 'global', ()),
    ('audio_2x5x2', 'window', 1, False, False, False, (), 5, 5, 'window(1)', ('t',)),
    ('audio_2x5x2', 'window', 1, False, False, True, (), 6, 6, 'window(1)', ('t',)),
    ('audio_2x5x2', 'window', 1, False, True, False, (), 10, 10, 'same_band+window(1)', ('f', 't')),
    ('audio_2x5x2', 'window', 1, False, True, True, (), 12, 12, 'same_band+window(1)', ('f', 't')),
    ('audio_2x5x2', 'window', 2, True, False, False, (8, 8, 4), 1, 1, 'global', ()),
    ('audio_2x5x2', 'window', 2, True, False, True, (8, 8, 4), 2, 2, 'global', ()),
    ('audio_2x5x2', 'window', 2, True, True, False, (4, 4, 2, 4, 4, 2), 1, 1, 'global', ()),
    ('audio_2x5x2', 'window', 2, True, True, True, (4, 4, 2, 4, 4, 2), 2, 2, 'global', ()),
    ('audio_2x5x2', 'window', 2, False, False, False, (), 3, 3, 'window(2)', ('t',)),
    ('audio_2x5x2', 'window', 2, False, False, True, (), 4, 4, 'window(2)', ('t',)),
    ('audio_2x5x2', 'window', 2, False, True, False, (), 6, 6, 'same_band+window(2)', ('f', 't')),
    ('audio_2x5x2', 'window', 2, False, True, True, (), 8, 8, 'same_band+window(2)', ('f', 't')),
    ('audio_2x5x2', 'window', 3, True, False, False, (12, 8), 1, 1, 'global', ()),
    ('audio_2x5x2', 'window', 3, True, False, True, (12, 8), 2, 2, 'global', ()),
    ('audio_2x5x2', 'window', 3, True, True, False, (6, 4, 6, 4), 1, 1, 'global', ()),
    ('audio_2x5x2', 'window', 3, True, True, True, (6, 4, 6, 4), 2, 2, 'global', ()),
    ('audio_2x5x2', 'window', 3, False, False, False, (), 2, 2, 'window(3)', ('t',)),
    ('audio_2x5x2', 'window', 3, False, False, True, (), 3, 3, 'window(3)', ('t',)),
    ('audio_2x5x2', 'window', 3, False, True, False, (), 4, 4, 'same_band+window(3)', ('f', 't')),
    ('audio_2x5x2', 'window', 3, False, True, True, (), 6, 6, 'same_band+window(3)', ('f', 't')),
]


def test_plan_layout_composes_the_engine_guarantees_and_keeps_every_value():
    """plan_layout only composes engine calls, and every mode and flag gives exactly what its hand-written
    formulas gave (schedules derive from these)."""
    from mmmerge.adapters.layout import TokenGrid, plan_layout

    assert len(OLD_LAYOUTS) == 168
    for grid_name, mode, k, budget, within_band, padded, sizes, runs, cliques, rule, carried in OLD_LAYOUTS:
        (protected, axes), band = LAYOUT_GRIDS[grid_name]
        layout = plan_layout(TokenGrid(protected, axes), mode, k, budget, band_axis=band, within_band=within_band,
                             padded=padded)
        case = (grid_name, mode, k, budget, within_band, padded)
        assert layout.grouping == mm.Grouping(sizes, mm.constraints.Guarantee(runs, cliques)), case
        assert (repr(layout.constraint), layout.carried) == (rule, carried), case


def _trailing_padding(B, rows, T, per_step, padded_steps):
    """``[B, rows * T * per_step]`` valid mask: ``rows`` rows of ``T`` steps (``per_step`` tokens each), the last
    ``padded_steps[b]`` steps of every row padding in batch row b."""
    steps = torch.arange(T).repeat_interleave(per_step).repeat(rows)
    return torch.stack([steps < T - p for p in padded_steps[:B]])


def test_padded_guarantee_agrees_with_the_static_one_on_trailing_padding():
    """One rule counts padding: the mask-reading padded_guarantee (engine calls) and static_guarantee (adapters,
    at patch time) agree on time-major tokens with trailing padded steps; band-major rows also count the change
    from one band's padding to the next band's real tokens in the mask, which only loosens the runs."""
    C = mm.constraints
    G = C.Guarantee
    for T, S in ((4, 3), (5, 2), (7, 1)):
        rules = [C.Global(), C.SameSpan("t", "within_frame", T), C.Adjacent("t", steps=T)]
        rules += [C.Window(k, "t", steps=T) for k in (1, 2, 3)]
        for c in rules:
            for padded_steps in ([0, 0], [1, 0], [0, T - 1], [2, 1]):
                valid = _trailing_padding(2, 1, T, S, padded_steps)
                expected = C.static_guarantee(c, padded=max(padded_steps) > 0)
                assert C.padded_guarantee(c, valid) == expected, (c, T, S, padded_steps)
            assert C.padded_guarantee(c, None) == C.static_guarantee(c) == c.guarantee()
    # the values the rule gives, by hand (T = 5 steps, one padding break)
    assert C.static_guarantee(C.SameSpan("t", "within_frame", 5), True) == G(5, 5)  # the break ends a frame
    assert C.static_guarantee(C.Adjacent("t", steps=5), True) == G(4, 5)  # one run more, cliques per step
    assert C.static_guarantee(C.Window(2, "t", steps=5), True) == G(4, 4)  # one run and one block more
    assert C.static_guarantee(C.Global(), True) == G(2, 2)
    assert C.guarantee_with_padding(C.Global(), 3) == G(4, 2)  # never more than double the cliques
    assert C.group_guarantee(True) == G(2, 2) and C.group_guarantee(True, spans_steps=False) == G(1, 1)
    F, T = 3, 6
    for c in (C.SameSpan("f", "same_band", F), C.AllOf(C.SameSpan("f", "same_band", F), C.Window(2, "t", steps=T)),
              C.AllOf(C.SameSpan("f", "same_band", F), C.Adjacent("t", steps=T)),
              C.AllOf(C.SameSpan("f", "same_band", F), C.Adjacent("t", steps=T, tiled=True))):
        static = C.static_guarantee(c, padded=True)
        masked = C.padded_guarantee(c, _trailing_padding(2, F, T, 1, [2, 1]))  # 2F - 1 changes per row
        assert masked.runs == static.runs + F - 1 and masked.cliques >= static.cliques, c
    assert C.static_guarantee(C.SameSpan("f", "same_band", F), True) == G(2 * F, 2 * F)
    with pytest.raises(ValueError, match="rows of those steps"):
        C.static_guarantee(C.Adjacent("f", steps=F), True)


@pytest.mark.parametrize("constraint", ["global", "within_frame", "adjacent", "window(1)", "window(2)",
                                        "same_band", "same_band+adjacent", "same_band+window(2)"])
def test_static_guarantee_bounds_the_runs_and_cliques_of_padded_tokens(constraint):
    """Soundness: on tokens in the rule's order with trailing padded steps, before and after a reduction, the
    runs of neighbours that may merge (padding apart from real) and the cliques that hold a token stay within
    static_guarantee."""
    C = mm.constraints
    torch.manual_seed(0)
    T, S = 5, 4
    band_major = constraint.startswith("same_band")
    parts = [rule(c, T, S) for c in constraint.split("+")]
    if constraint == "same_band+adjacent":  # two tokens per band and step here: not tiled
        parts[1] = C.Adjacent("t", steps=T)
    constraint_rule = parts[0] if len(parts) == 1 else C.AllOf(*parts)
    state0 = video_state(2, T, S, 1, band_major=band_major)
    t = state0.coords["t_min"]
    state0.valid = torch.cat([t[:1] < T - 2, t[1:] < T - 1])  # trailing padding: 2 steps, 1 step
    static = C.static_guarantee(constraint_rule, padded=True)
    x = torch.randn(2, state0.num_tokens, 8)
    _, merged = mm.reduce_tokens(x, keep=12, method="tps", constraint=constraint_rule, state=state0)
    for state in (state0, merged):
        P, N = state.protected, state.num_tokens
        idx = torch.arange(P, N, device=t.device).unsqueeze(0).expand(2, -1)
        allowed = C.allowed_pairs(state, constraint_rule, idx[:, :-1], idx[:, 1:])
        neighbours = torch.ones(2, N - P - 1, dtype=torch.bool) if allowed is None else \
            torch.diagonal(allowed, dim1=1, dim2=2)
        assert 1 + int((~neighbours).sum(1).max()) <= static.runs
        cover = C.clique_cover(state, constraint_rule, idx)
        cliques = 1 if cover is None else int(cover.any(1).sum(1).max())
        assert cliques <= static.cliques
