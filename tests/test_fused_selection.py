"""The fused ``dominant`` step (``mmmerge.fused_selection``): its plan op chooses what the engine's ``dominant`` chooses
(without padding, and over rows with per-row quotas), ties included; its registration; ``reduce_tokens`` dispatches
it where it applies; its Triton kernels on ties (the random cases are in ``mmmerge.kernel_check``)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import mmmerge
from mmmerge.fused import FUSED_ENV, _apply, row_tables
from test_fused import _interpreted, _needs_triton


def _inputs(B: int, N: int, seed: int = 0, ties: bool = False):
    """``(metric [B, N, 6], x [B, N, 5], score [B, N], size [B, N])``; ``ties``: a few distinct metric rows (exact
    similarity ties) and integer scores (importance ties)."""
    gen = torch.Generator().manual_seed(seed)
    metric, x = torch.randn(B, N, 6, generator=gen), torch.randn(B, N, 5, generator=gen)
    score = torch.randn(B, N, generator=gen)
    if ties:
        metric = torch.randn(4, 6, generator=gen)[torch.randint(0, 4, (B, N), generator=gen)]
        score = torch.randint(0, 3, (B, N), generator=gen).float()
    return metric, x, score, torch.randint(1, 4, (B, N), generator=gen).float()


def _check_same(x, state, plan, fused_plan):
    """The fused plan gives the engine plan's slots, merged tokens, sizes and sources (and padding mask)."""
    assert torch.equal(fused_plan[4], plan.assign)
    want, want_state = mmmerge.merge_tokens(x, state, plan)
    got, got_state = _apply(x, state, (*fused_plan, state.size))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_state.source, want_state.source) and torch.equal(got_state.size, want_state.size)
    if state.valid is not None:
        assert torch.equal(got_state.valid, want_state.valid)


@pytest.mark.parametrize("P,r,contextual", [
    (0, 20, None), (1, 20, None), (1, 23, None),  # 16 kept: the default 2.5 contextual rounds to 2
    (1, 20, 3), (2, 30, 1), (1, 30, 9),  # 9 kept, 9 contextual: no dominant token
    (1, 1, None), (1, 38, None)])  # one token removed; one kept
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_the_plan_op_equals_the_engines_dominant(P, r, contextual, ties):
    B, N = 3, 40
    metric, x, score, size = _inputs(B, N, ties=ties)
    state = replace(mmmerge.init_state(B, N, protected=P), size=size)
    plan = mmmerge.dominant(metric, state, r, score=score, contextual=contextual)
    _check_same(x, state, plan, torch.ops.mmmerge.dominant_plan(metric, score, P, r, contextual or 0))


def test_non_finite_scores_are_taken_as_the_engine_takes_them():
    metric, x, score, size = _inputs(2, 30)
    score[0, :6] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("inf"), -0.0, 0.0])
    state = replace(mmmerge.init_state(2, 30, protected=1), size=size)
    plan = mmmerge.dominant(metric, state, 20, score=score, contextual=2)
    _check_same(x, state, plan, torch.ops.mmmerge.dominant_plan(metric, score, 1, 20, 2))


def _rows(lengths=(40, 31, 20, 28), quota=(12, 9, 4, 3), r=12):
    """A padded batch of rows of their own lengths and real removals (the rest from their padding), the state with
    its padding mask, and the rows' counts (``row_tables``)."""
    N = max(lengths)
    valid = torch.arange(N).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    (counts,) = row_tables("dominant", lengths, quota, N, r)
    return valid, torch.tensor(quota), r, counts


@pytest.mark.parametrize("contextual", [None, 1, 3, 8])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_per_row_counts_give_the_engines_quota_plan(contextual, ties):
    valid, quota, r, counts = _rows()
    B, N = valid.shape
    metric, x, score, size = _inputs(B, N, seed=2, ties=ties)
    state = replace(mmmerge.init_state(B, N, valid=valid), size=size)
    plan = mmmerge.dominant(metric, state, r, score=score, contextual=contextual, quota=quota)
    _check_same(x, state, plan, torch.ops.mmmerge.dominant_plan(metric, score, 0, r, contextual or 0, counts))


def test_the_op_passes_opcheck():
    metric, _, score, _ = _inputs(2, 30)
    torch.library.opcheck(torch.ops.mmmerge.dominant_plan, (metric, score, 1, 20, 0))
    torch.library.opcheck(torch.ops.mmmerge.dominant_plan, (metric, score, 1, 20, 4, None))
    valid, quota, r, counts = _rows()
    metric, _, score, _ = _inputs(*valid.shape)
    torch.library.opcheck(torch.ops.mmmerge.dominant_plan, (metric, score, 0, r, 0, counts))
    torch.library.opcheck(torch.ops.mmmerge.dominant_plan, (metric, score, 0, r, 3, counts))


def _dispatched(call) -> bool:
    return any("dominant_plan" in str(op) for op in mmmerge.count_ops(call))


@pytest.mark.parametrize("rows", [False, True], ids=["plain", "rows"])
def test_reduce_tokens_takes_the_fused_step_and_equals_the_engine(rows, monkeypatch):
    """``reduce_tokens(..., "dominant", score=...)`` dispatches the plan op (plain, and over rows with budgets of
    their own) and gives the engine path's tokens, sizes and sources; with MMMERGE_FUSED=0 the engine path runs."""
    gen = torch.Generator().manual_seed(5)
    if rows:
        budgets = mmmerge.plan_rows("dominant", [40, 31, 20], [10, 8, 5])
        x = torch.randn(3, budgets.width, 8, generator=gen)
        kwargs = dict(keep=budgets.out, rows=budgets, score=torch.randn(3, budgets.width, generator=gen))
    else:
        x = torch.randn(3, 40, 8, generator=gen)
        kwargs = dict(keep=12, protected=1, score=torch.randn(3, 40, generator=gen))
    metric = torch.randn(*x.shape[:2], 4, generator=gen)
    outs = []
    for fused, contextual in ((True, None), (True, 2), (False, None), (False, 2)):
        monkeypatch.setenv(FUSED_ENV, "1" if fused else "0")

        def call():
            return mmmerge.reduce_tokens(x, method="dominant", metric=metric, contextual=contextual, **kwargs)

        assert _dispatched(call) == fused
        outs.append(call())
    for (y, state), (want, want_state) in zip(outs[:2], outs[2:]):
        torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)
        assert torch.equal(state.source, want_state.source) and torch.equal(state.size, want_state.size)
        assert (state.valid is None) == (want_state.valid is None)
        assert state.valid is None or torch.equal(state.valid, want_state.valid)


def test_without_a_score_or_under_a_rule_dominant_takes_the_engine_path():
    x, score = torch.randn(2, 32, 8), torch.randn(2, 32)
    assert not _dispatched(lambda: mmmerge.reduce_tokens(x, 8, "dominant"))
    t = torch.arange(32).float() // 8  # 4 frames of 8 tokens
    state = mmmerge.init_state(2, 32, coords={"t_min": t, "t_max": t}, rules={"t_min": "min", "t_max": "max"})
    rule = mmmerge.parse_constraint("within_frame", steps={"t": 4})
    assert not _dispatched(lambda: mmmerge.reduce_tokens(x, 8, "dominant", state=state, constraint=rule, score=score))
    assert not _dispatched(lambda: mmmerge.reduce_tokens(x, 8, "dominant", state=state, score=score))  # coordinates
    valid = torch.arange(32).unsqueeze(0) < torch.tensor([[32], [20]])
    assert not _dispatched(lambda: mmmerge.reduce_tokens(x, 8, "dominant", score=score,
                                                         state=mmmerge.init_state(2, 32, valid=valid)))


def test_too_many_contextual_tokens_are_refused_on_the_fused_path_too():
    x, score = torch.randn(2, 32, 8), torch.randn(2, 32)
    with pytest.raises(ValueError, match="contextual=9 is more than the 8 mergeable tokens kept"):
        mmmerge.reduce_tokens(x, 8, "dominant", score=score, contextual=9)


def test_the_kernels_choose_as_the_reference_on_ties():
    """Importance ties keep the lower index, similarity ties the first target in position order; non-finite scores
    as the engine takes them (the random cases without ties: ``mmmerge.kernel_check``)."""
    _needs_triton()
    result = _interpreted("""
        import torch
        from mmmerge import triton_selection
        from mmmerge.fused import row_tables
        from mmmerge.fused_selection import dominant_reference
        from test_fused_selection import _inputs
        (counts,) = row_tables("dominant", [40, 31, 20], [12, 9, 4], 40, 12)
        for P, r, contextual, rows in ((1, 20, 0, None), (1, 25, 3, None), (0, 12, 0, counts), (0, 12, 2, counts)):
            metric, _, score, _ = _inputs(3, 40, seed=r, ties=True)
            score[0, :6] = torch.tensor([float("nan"), float("inf"), float("-inf"), float("inf"), -0.0, 0.0])
            want = dominant_reference(metric, score, P, r, contextual, rows)
            got = triton_selection.dominant_plan(metric, score, P, r, contextual, rows)
            assert all(torch.equal(w, g) for w, g in zip(want, got)), (P, r, contextual)
        print("same")
    """)
    assert result.returncode == 0 and "same" in result.stdout, result.stdout + result.stderr
