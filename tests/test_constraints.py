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
