"""Per-row budgets (``mmmerge.reduce.plan_rows``): rows of different lengths and keeps in one padded batch, one
``reduce_tokens`` call, every row reduced exactly as alone (every method)."""
import pytest
import torch

import mmmerge as mm
from mmmerge.reduce import plan_rows

METHODS = ["tome", "pitome", "tps", "prune", "random", "dominant", "divprune", "cdpruner"]
LENGTHS = (64, 37, 50, 20, 64)  # one row without padding, rows of odd and even lengths
QUARTER = (16, 10, 13, 5, 7)  # several rounds for the bipartite methods, one row further than the others
HALF = (40, 20, 30, 12, 33)  # one round for every method


def padded(rows, g, width, channels):
    """Random rows ``[len, channels]`` and their padded batch ``[rows, width, channels]`` (zeros after each row)."""
    parts = [torch.randn(n, channels, generator=g) for n in rows]
    out = torch.zeros(len(rows), width, channels)
    for b, p in enumerate(parts):
        out[b, : p.shape[0]] = p
    return parts, out


def options(method, g, B, W, rows, single_step):
    """The method's per-token options for the batch and for each row alone (one row's slice of them)."""
    if method in ("tps", "prune", "dominant"):
        score = torch.rand(B, W, generator=g)
        return {"score": score}, [{"score": score[b: b + 1, :n]} for b, n in enumerate(rows)]
    if method == "random" and single_step:
        noise = torch.rand(B, W, generator=g)
        return {"noise": noise}, [{"noise": noise[b: b + 1, :n]} for b, n in enumerate(rows)]
    if method == "cdpruner":
        query, mask = torch.randn(B, 6, 16, generator=g), torch.rand(B, 6, generator=g) > 0.3
        return ({"query": query, "query_mask": mask},
                [{"query": query[b: b + 1], "query_mask": mask[b: b + 1]} for b in range(B)])
    return {}, [{}] * B


@pytest.mark.parametrize("keeps", [QUARTER, HALF], ids=["quarter", "half"])
@pytest.mark.parametrize("method", METHODS)
def test_one_padded_call_equals_every_row_alone(method, keeps):
    single_step = keeps is HALF
    if method == "random" and not single_step:
        pytest.skip("random draws its own noise per round: only a given noise (one round) compares")
    g = torch.Generator().manual_seed(3)
    budgets = plan_rows(method, LENGTHS, keeps)
    assert budgets.out >= max(keeps) and budgets.width >= max(LENGTHS)
    xs, x = padded(LENGTHS, g, budgets.width, 16)
    ms, metric = padded(LENGTHS, g, budgets.width, 8)
    together, alone = options(method, g, len(LENGTHS), budgets.width, LENGTHS, single_step)
    self_metric = method in ("divprune", "cdpruner")
    y, state = mm.reduce_tokens(x, budgets.out, method, metric=None if self_metric else metric, rows=budgets,
                                **together)
    assert y.shape == (len(LENGTHS), budgets.out, 16)
    for b, (n, k) in enumerate(zip(LENGTHS, keeps)):
        y1, s1 = mm.reduce_tokens(xs[b][None], k, method, metric=None if self_metric else ms[b][None], **alone[b])
        assert torch.equal(state.source[b, :n], s1.source[0])
        assert torch.equal(state.size[b, :k], s1.size[0])
        assert bool(state.valid[b, :k].all()) and not bool(state.valid[b, k:].any())
        torch.testing.assert_close(y[b, :k], y1[0], atol=1e-6, rtol=1e-5)


def test_uneven_rounds_pad_the_batch_and_plan_checks():
    budgets = plan_rows("tome", (40, 10), (5, 9))  # 3 rounds for the first row; the second takes one
    assert budgets.steps == (20, 10, 5) and budgets.removed == ((20, 1), (10, 0), (5, 0))
    # the short row's padding gives up 19, 10 and 5 tokens in turn (a bipartite step halves it at most): the second
    # round needs 2 * 10 padding tokens left after the first 19
    assert budgets.width == 10 + 19 + 2 * 10 and budgets.out == budgets.width - 35
    assert plan_rows("tps", (40, 10), (5, 9)).steps == (35,)
    with pytest.raises(ValueError, match="keep between 1 and 10"):
        plan_rows("tome", (40, 10), (5, 11))
    x = torch.randn(2, budgets.width, 4)
    with pytest.raises(ValueError, match="planned for 'tome'"):
        mm.reduce_tokens(x, budgets.out, "tps", rows=budgets)
    with pytest.raises(ValueError, match="keep="):
        mm.reduce_tokens(x, budgets.out + 1, "tome", rows=budgets)
    dominant = plan_rows("dominant", (40, 10), (8, 3))
    with pytest.raises(ValueError, match="contextual=4"):
        mm.reduce_tokens(torch.randn(2, dominant.width, 4), dominant.out, "dominant", rows=dominant, contextual=4)
