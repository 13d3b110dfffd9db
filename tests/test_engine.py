"""Core engine: merge arithmetic, ToMe reference, order, identity, dtypes, gradients, errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import mmmerge as mm
from mmmerge.matchers import identity_plan

from helpers import has_increasing_representatives

BIPARTITE = ["tome", "pitome", "random"]
ALL_METHODS = ["tome", "pitome", "tps", "random", "prune"]


def group_means(x, source, n_out):
    """Independent check: mean of the originals in each source group (all sizes start at 1)."""
    B, N, C = x.shape
    out = torch.zeros(B, n_out, C, dtype=torch.float64)
    count = torch.zeros(B, n_out, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            out[b, source[b, i]] += x[b, i].double()
            count[b, source[b, i]] += 1
    return out / count.unsqueeze(-1), count


@pytest.mark.parametrize("method", BIPARTITE)
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_merged_tokens_are_size_weighted_means_of_their_sources(method, protected):
    torch.manual_seed(0)
    x = torch.randn(3, 41, 8)
    y, state = mm.reduce_tokens(x, keep=9, method=method, protected=protected)
    assert y.shape == (3, 9, 8) and state.size.shape == (3, 9) and state.source.shape == (3, 41)
    expected, count = group_means(x, state.source, 9)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state.size.double(), count)
    assert torch.all(state.size.sum(1) == 41)
    # sum(size * x) is conserved
    torch.testing.assert_close((state.size.unsqueeze(-1) * y).sum(1), x.sum(1), atol=1e-5, rtol=1e-5)
    # protected tokens stay first and alone
    for p in range(protected):
        assert torch.all(state.source[:, p] == p) and torch.all(state.size[:, p] == 1)
        torch.testing.assert_close(y[:, p], x[:, p])


@pytest.mark.parametrize("method", ALL_METHODS)
def test_sizes_sum_to_n_and_source_covers_every_output(method):
    torch.manual_seed(7)
    x = torch.randn(2, 37, 6)
    y, state = mm.reduce_tokens(x, keep=10, method=method, protected=1)
    assert y.shape == (2, 10, 6) and state.size.shape == (2, 10) and state.source.shape == (2, 37)
    assert torch.all(state.size.sum(1) == 37)
    for b in range(2):
        counts = torch.bincount(state.source[b], minlength=10)
        assert torch.equal(counts.float(), state.size[b]), "size must count the originals each token holds"


@pytest.mark.parametrize("method", BIPARTITE)
def test_chained_reductions_stay_size_weighted_means_of_the_originals(method):
    # The second call starts from unequal sizes: a plain (unweighted) mean would fail here.
    torch.manual_seed(8)
    x = torch.randn(2, 60, 5)
    y1, s1 = mm.reduce_tokens(x, keep=25, method=method, protected=1)
    y2, s2 = mm.reduce_tokens(y1, keep=7, method=method, state=s1)
    assert s2.source.shape == (2, 60) and torch.all(s2.size.sum(1) == 60)
    expected, count = group_means(x, s2.source, 7)
    torch.testing.assert_close(y2.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s2.size.double(), count)
    torch.testing.assert_close((s2.size.unsqueeze(-1) * y2).sum(1), x.sum(1), atol=1e-5, rtol=1e-5)


def reference_tome(x, r, protected):
    """Plain-loop ToMe step with the documented output order (sizes all 1): protected, then survivors in order."""
    B, N, C = x.shape
    outs, sizes = [], []
    for b in range(B):
        m = F.normalize(x[b, protected:], dim=-1)
        M = m.shape[0]
        a_pos, b_pos = list(range(0, M, 2)), list(range(1, M, 2))
        edges = []
        for a in a_pos:
            sims = [float(m[a] @ m[bb]) for bb in b_pos]
            best = max(range(len(b_pos)), key=lambda k: sims[k])
            edges.append((sims[best], a, b_pos[best]))
        edges.sort(key=lambda e: -e[0])
        target = {i: i for i in range(M)}
        for _, a, bb in edges[:r]:
            target[a] = bb
        groups = {}
        for i in range(M):
            groups.setdefault(target[i], []).append(i)
        ordered = [groups[k] for k in sorted(groups)]  # survivors in their current order
        rows = [x[b, p] for p in range(protected)] + [x[b, protected + torch.tensor(g)].mean(0) for g in ordered]
        outs.append(torch.stack(rows))
        sizes.append(torch.tensor([1.0] * protected + [float(len(g)) for g in ordered]))
    return torch.stack(outs), torch.stack(sizes)


@pytest.mark.parametrize("B,N,r,protected", [(1, 10, 3, 0), (2, 17, 8, 1), (3, 33, 5, 2), (2, 64, 32, 0), (1, 9, 1, 4)])
def test_tome_matches_reference_implementation(B, N, r, protected):
    torch.manual_seed(B * 100 + N)
    x = torch.randn(B, N, 12)
    state = mm.init_state(B, N, protected=protected)
    plan = mm.plan_merge(x, state, r, "tome")
    y, new_state = mm.merge_tokens(x, state, plan)
    ref_y, ref_size = reference_tome(x, r, protected)
    torch.testing.assert_close(y, ref_y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(new_state.size, ref_size)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_r_zero_and_keep_all_are_the_identity(method):
    x = torch.randn(2, 20, 6)
    state = mm.init_state(2, 20, protected=1)
    y, s = mm.merge_tokens(x, state, mm.plan_merge(x, state, 0, method))
    assert torch.equal(y, x) and torch.equal(s.source, state.source) and torch.equal(s.size, state.size)
    y2, s2 = mm.reduce_tokens(x, keep=20, method=method, protected=1)
    assert torch.equal(y2, x) and torch.equal(s2.source, state.source)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_output_order_is_protected_then_survivors_in_order(method):
    torch.manual_seed(1)
    x = torch.randn(2, 50, 8)
    plan = mm.plan_merge(x, mm.init_state(2, 50, protected=2), 10, method)
    _, state = mm.reduce_tokens(x, keep=12, method=method, protected=2)
    for b in range(2):
        assert plan.assign[b, :2].tolist() == [0, 1] and state.source[b, :2].tolist() == [0, 1]
        assert has_increasing_representatives(plan.assign[b], plan.num_out)
        assert has_increasing_representatives(state.source[b], 12)


def test_unmerge_spreads_group_values_back():
    torch.manual_seed(2)
    x = torch.randn(2, 30, 4)
    y, state = mm.reduce_tokens(x, keep=8, protected=1)
    full = mm.unmerge(y, state)
    assert full.shape == x.shape
    for b in range(2):
        for i in range(30):
            assert torch.equal(full[b, i], y[b, state.source[b, i]])


def test_coordinates_follow_their_rules():
    x = torch.randn(1, 12, 4)
    t = torch.arange(12.0) // 4  # three frames of four tokens
    state = mm.init_state(1, 12, coords={"t": t, "t_min": t, "t_max": t}, rules={"t_min": "min", "t_max": "max"})
    y, s = mm.reduce_tokens(x, keep=3, state=state)
    for j in range(3):
        members = t[s.source[0] == j]
        assert s.coords["t_min"][0, j] == members.min() and s.coords["t_max"][0, j] == members.max()
        torch.testing.assert_close(s.coords["t"][0, j], members.mean())


def test_tps_squeezes_with_similarity_softmax_weights():
    # Three tokens: two nearly parallel, one orthogonal. Remove one.
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]]])
    score = torch.tensor([[1.0, 1.0, 0.0]])  # token 2 is least important
    state = mm.init_state(1, 3)
    for temp in (1.0, 0.1):
        plan = mm.plan_merge(x, state, 1, "tps", score=score, temperature=temp)
        y, s = mm.merge_tokens(x, state, plan)
        cos = F.cosine_similarity(x[0, 2], x[0, 0], dim=0)
        w = torch.exp((cos - 1) / temp)
        expected = (x[0, 0] + w * x[0, 2]) / (1 + w)
        torch.testing.assert_close(y[0, 0], expected)
        torch.testing.assert_close(y[0, 1], x[0, 1])
        assert s.size.tolist() == [[2.0, 1.0]]


def test_prune_keeps_values_and_moves_bookkeeping():
    torch.manual_seed(3)
    x = torch.randn(2, 16, 5)
    score = torch.rand(2, 16)
    y, s = mm.reduce_tokens(x, keep=6, method="prune", score=score)
    kept = score.argsort(dim=1, descending=True)[:, :6]
    for b in range(2):
        for j in range(6):
            members = torch.nonzero(s.source[b] == j).flatten()
            host = [int(i) for i in members if int(i) in kept[b].tolist()]
            assert len(host) == 1, "each output holds exactly one kept token"
            torch.testing.assert_close(y[b, j], x[b, host[0]])
    assert torch.all(s.size.sum(1) == 16)


def test_proportional_attention_equals_attention_over_duplicates():
    torch.manual_seed(4)
    B, H, D = 2, 3, 8
    keys = torch.randn(B, H, 5, D)
    values = torch.randn(B, H, 5, D)
    q = torch.randn(B, H, 7, D)
    size = torch.tensor([[1.0, 3.0, 2.0, 1.0, 4.0], [2.0, 1.0, 1.0, 5.0, 1.0]])
    bias = mm.size_bias(size)
    assert bias.shape == (B, 1, 1, 5)
    merged = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
    eager = torch.softmax(q @ keys.transpose(-1, -2) / math.sqrt(D) + bias, -1) @ values
    torch.testing.assert_close(merged, eager, atol=1e-5, rtol=1e-5)
    for b in range(B):
        rep = size[b].long()
        k_dup = keys[b].repeat_interleave(rep, dim=1)
        v_dup = values[b].repeat_interleave(rep, dim=1)
        dup = F.scaled_dot_product_attention(q[b], k_dup, v_dup)
        torch.testing.assert_close(merged[b], dup, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_dtype_is_preserved_and_zero_vectors_give_no_nan(method, dtype):
    x = torch.randn(2, 24, 8).to(dtype)
    x[:, 3:9] = 0  # zero vectors: similarity must stay finite
    y, s = mm.reduce_tokens(x, keep=7, method=method, protected=1)
    assert y.dtype == dtype
    assert torch.isfinite(y.float()).all() and torch.isfinite(s.size).all()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_gradients_flow_through_merging(method):
    x = torch.randn(2, 20, 6, requires_grad=True)
    y, _ = mm.reduce_tokens(x, keep=5, method=method)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("method", ["tome", "pitome", "tps"])
def test_the_merge_gradient_is_exact_when_a_slot_receives_several_tokens(method):
    """The weighted mean's gradient, checked against finite differences (a slot written once per member must
    still pass its gradient back once)."""
    metric = torch.randn(2, 20, 6, dtype=torch.double)
    state = mm.init_state(2, 20)
    plan = mm.plan_merge(metric.float(), state, r=9, method=method)
    slots = plan.assign.gather(1, plan.merged)
    assert (slots.unsqueeze(2) == slots.unsqueeze(1)).sum(-1).max() > 1  # some slot has several members
    x = torch.randn(2, 20, 5, dtype=torch.double, requires_grad=True)
    plan.weight = plan.weight.double()
    assert torch.autograd.gradcheck(lambda x: mm.merge_weighted(x, plan), (x,))


def frame_state(T: int, S: int):
    """State of a CLS token plus T frames of S tokens each (t_min = t_max = frame), batch of 2."""
    t = torch.cat([torch.tensor([-1.0]), torch.arange(T * S) // S])
    return mm.init_state(2, 1 + T * S, protected=1, coords={"t_min": t, "t_max": t},
                         rules={"t_min": "min", "t_max": "max"})


def test_grouped_plan_gives_each_group_its_budget():
    torch.manual_seed(5)
    T, S = 4, 10
    x = torch.randn(2, 1 + T * S, 8)
    state = frame_state(T, S)
    for method in ["tome", "pitome", "tps"]:
        plan = mm.plan_merge(x, state, 8, method, groups=T)
        y, s = mm.merge_tokens(x, state, plan)
        assert y.shape[1] == 1 + T * (S - 2)
        frame_of_slot = s.coords["t_min"][:, 1:].reshape(2, T, S - 2)
        assert torch.all(frame_of_slot == torch.arange(T).view(1, T, 1))
        assert torch.all(s.coords["t_min"] == s.coords["t_max"])


def test_grouped_plan_splits_a_given_score_with_the_tokens():
    torch.manual_seed(6)
    T, S = 3, 6
    x = torch.randn(2, 1 + T * S, 4)
    state = frame_state(T, S)
    score = torch.rand(2, 1 + T * S)
    for method in ["tps", "prune"]:
        plan = mm.plan_merge(x, state, 6, method, groups=T, score=score)
        _, s = mm.merge_tokens(x, state, plan)
        for b in range(2):
            for f in range(T):
                frame = 1 + f * S + torch.arange(S)
                kept = frame[score[b, frame].argsort(descending=True)[:4]]
                # Each frame keeps its own 4 highest-scoring tokens as the survivors (hosts).
                hosts = {int(s.source[b, i]) for i in kept}
                assert len(hosts) == 4 and hosts == {int(s.source[b, i]) for i in frame}


# ------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        mm.reduce_tokens(torch.randn(10, 4), keep=3)
    with pytest.raises(ValueError, match="keep=11"):
        mm.reduce_tokens(x, keep=11)
    with pytest.raises(ValueError, match="protected\\+1"):
        mm.reduce_tokens(x, keep=2, protected=2)
    with pytest.raises(TypeError, match="keep must be an int"):
        mm.reduce_tokens(x, keep=2.5)
    with pytest.raises(ValueError, match="r must be >= 0"):
        mm.plan_merge(x, mm.init_state(2, 10), -1)
    with pytest.raises(ValueError, match="too large"):
        mm.plan_merge(x, mm.init_state(2, 10), 6, "tome")
    with pytest.raises(ValueError, match="describes 9 tokens"):
        mm.reduce_tokens(x, keep=3, state=mm.init_state(2, 9))
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        mm.reduce_tokens(x, keep=3, method="bogus")
    with pytest.raises(ValueError, match="unknown constraint 'sideways'"):
        mm.reduce_tokens(x, keep=3, constraint="sideways")
    with pytest.raises(ValueError, match="needs coordinates"):
        mm.reduce_tokens(x, keep=3, constraint="within_frame")
    with pytest.raises(ValueError, match="source map"):
        mm.unmerge(x, mm.init_state(2, 10, trace_source=False))
    with pytest.raises(ValueError, match="metric must be"):
        mm.reduce_tokens(x, keep=3, metric=torch.randn(2, 9, 4))


def test_more_bad_inputs_name_the_problem():
    x = torch.randn(2, 10, 4)
    y, state = mm.reduce_tokens(x, keep=4)
    with pytest.raises(ValueError, match="describes 4 tokens but the tokens tensor has 5"):
        mm.unmerge(torch.randn(2, 5, 4), state)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        mm.unmerge(y[0], state)
    with pytest.raises(ValueError, match=r"metric must be \[B, N, C\]"):
        mm.plan_merge(torch.randn(10, 4), mm.init_state(2, 10), 1)
    with pytest.raises(ValueError, match="describes 10 tokens but the tokens tensor has 9"):
        mm.plan_merge(torch.randn(2, 9, 4), mm.init_state(2, 10), 1)
    plan = mm.plan_merge(x, mm.init_state(2, 10), 2)
    with pytest.raises(ValueError, match="as in the plan"):
        mm.merge_tokens(torch.randn(2, 9, 4), mm.init_state(2, 10), plan)
    with pytest.raises(ValueError, match="protected=2 disagrees with state.protected=1"):
        mm.reduce_tokens(x, keep=3, protected=2, state=mm.init_state(2, 10, protected=1))
    with pytest.raises(ValueError, match="protected must be an int"):
        mm.reduce_tokens(x, keep=3, protected=10)
    with pytest.raises(TypeError, match="r must be an int"):
        mm.plan_merge(x, mm.init_state(2, 10), 1.5)
    with pytest.raises(ValueError, match="r must be >= 0"):
        mm.plan_merge(x, mm.init_state(2, 10), -2, "tps")
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        mm.plan_merge(x, mm.init_state(2, 10), 1, "bogus")
    with pytest.raises(ValueError, match="unknown constraint 'window\\(0x\\)'"):
        mm.plan_merge(x, mm.init_state(2, 10), 1, constraint="window(0x)")
    with pytest.raises(TypeError, match="constraint must be a name"):
        mm.plan_merge(x, mm.init_state(2, 10), 1, constraint=3)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_all_zero_input_gives_no_nan(method):
    x = torch.zeros(2, 16, 4, requires_grad=True)
    y, s = mm.reduce_tokens(x, keep=5, method=method, protected=1)
    assert torch.equal(y, torch.zeros(2, 5, 4)) and torch.all(s.size.sum(1) == 16)
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_infeasible_constraint_is_refused_before_anything_merges():
    # Every token in its own frame: within_frame allows no pair at all.
    x = torch.randn(1, 8, 4)
    t = torch.arange(8.0)
    state = mm.init_state(1, 8, coords={"t_min": t, "t_max": t}, rules={"t_min": "min", "t_max": "max"})
    for method in ["tome", "pitome", "tps"]:
        with pytest.raises(ValueError, match="too large"):
            mm.plan_merge(x, state, 2, method, constraint=mm.SameSpan("t", steps=8))
    with pytest.raises(ValueError, match="needs the number of steps"):
        mm.plan_merge(x, state, 2, "tome", constraint="within_frame")
    # Tokens out of the order the rule assumes (frames interleaved) are refused, not merged wrongly.
    shuffled = mm.init_state(1, 8, coords={"t_min": t % 2, "t_max": t % 2}, rules={"t_min": "min", "t_max": "max"})
    with pytest.raises(ValueError, match="sort the tokens"):
        mm.plan_merge(x, shuffled, 2, "tome", constraint=mm.SameSpan("t", steps=2))


def test_identity_plan_helper():
    s = mm.init_state(2, 5)
    p = identity_plan(s)
    assert p.num_out == 5 and torch.equal(p.assign[1], torch.arange(5))
