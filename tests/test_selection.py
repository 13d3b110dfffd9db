"""DivPrune and CDPruner matchers: loop references for the greedy selections, engine invariants, constraints,
the query, and their options."""
import itertools
import math

import pytest
import torch

import mmmerge as mm
from mmmerge.selection import cdpruner, divprune, dpp_select, max_min_select, query_relevance

METHODS = ["divprune", "cdpruner"]


def cosines(x):
    """``[M, C]`` -> ``M x M`` list of cosines in float64."""
    m = x.double()
    norm = m.norm(dim=-1).clamp_min(1e-12)
    return ((m @ m.T) / norm[:, None] / norm[None, :]).tolist()


def reference_max_min(x, keep):
    """DivPrune's greedy with loops: the token farthest from its nearest neighbour, then repeatedly the token
    whose minimum cosine distance to the chosen ones is largest."""
    sim = cosines(x)
    M = len(sim)
    first = max(range(M), key=lambda i: min(1.0 - sim[i][j] for j in range(M) if j != i))
    chosen = [first]
    while len(chosen) < keep:
        rest = [i for i in range(M) if i not in chosen]
        chosen.append(max(rest, key=lambda i: min(1.0 - sim[i][j] for j in chosen)))
    return chosen


def reference_dpp(x, keep, quality=None):
    """Greedy MAP with loops and explicit determinants: add the token that maximises det(L[S + {j}])."""
    S = torch.tensor(cosines(x), dtype=torch.float64)
    q = torch.ones(len(S), dtype=torch.float64) if quality is None else quality.double()
    L = q[:, None] * S * q[None, :]
    chosen = []
    for _ in range(keep):
        rest = [j for j in range(len(S)) if j not in chosen]
        dets = {j: float(torch.linalg.det(L[chosen + [j]][:, chosen + [j]])) for j in rest}
        best = max(dets.values())
        chosen.append(min(j for j in rest if dets[j] >= best - 1e-9))  # ties (e.g. equal qualities): first
    return chosen


def video_state(B, T, S, protected=0):
    t = torch.cat([torch.full((protected,), -10.0), (torch.arange(T * S) // S).float()])
    return mm.init_state(B, protected + T * S, protected=protected, coords={"t_min": t, "t_max": t},
                         rules={"t_min": "min", "t_max": "max"})


def groups(source, b, n_out):
    return [torch.nonzero(source[b] == j).flatten().tolist() for j in range(n_out)]


# ------------------------------------------------------------------------------------- loop references
@pytest.mark.parametrize("B,M,C,keep", [(3, 12, 5, 4), (2, 30, 8, 9), (1, 9, 3, 8), (2, 40, 16, 1)])
def test_max_min_selection_matches_the_loop_reference(B, M, C, keep):
    x = torch.randn(B, M, C, generator=torch.Generator().manual_seed(M + keep))
    m = torch.nn.functional.normalize(x, dim=-1)
    picked = max_min_select(m @ m.transpose(1, 2), keep)
    for b in range(B):
        assert picked[b].tolist() == reference_max_min(x[b], keep)  # same tokens, in the same order


@pytest.mark.parametrize("B,M,C,keep", [(3, 12, 6, 4), (2, 20, 12, 8), (1, 10, 10, 10), (2, 16, 4, 3)])
@pytest.mark.parametrize("with_quality", [False, True])
def test_dpp_greedy_map_matches_the_determinant_loop_reference(B, M, C, keep, with_quality):
    g = torch.Generator().manual_seed(M * 7 + keep)
    x = torch.randn(B, M, C, generator=g)
    q = torch.rand(B, M, generator=g) * 0.9 + 0.1 if with_quality else None
    m = torch.nn.functional.normalize(x.double(), dim=-1)
    picked = dpp_select((m @ m.transpose(1, 2)).float(), keep, q)
    for b in range(B):
        assert picked[b].tolist() == reference_dpp(x[b], keep, None if q is None else q[b])


def test_dpp_beyond_the_kernel_rank_still_picks_distinct_tokens():
    # Rank-3 similarity: after 3 picks every gain is zero; the greedy still returns keep distinct tokens.
    x = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(1))
    m = torch.nn.functional.normalize(x, dim=-1)
    picked = dpp_select(m @ m.transpose(1, 2), 8)
    for b in range(2):
        assert len(set(picked[b].tolist())) == 8
        first = reference_dpp(x[b], 3)
        assert picked[b, :3].tolist() == first


def test_divprune_keeps_one_token_of_each_cluster():
    # 4 tight clusters of 5 tokens: keeping 4, max-min diversity takes exactly one from each cluster, and every
    # other token merges into its own cluster's kept token.
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 6) * 3
    x = (centres.repeat_interleave(5, 0) + 0.05 * torch.randn(20, 6, generator=g)).unsqueeze(0)
    out, state = mm.reduce_tokens(x, keep=4, method="divprune")
    assert sorted(state.size[0].tolist()) == [5.0] * 4
    for members in groups(state.source, 0, 4):
        assert len({i // 5 for i in members}) == 1
    assert torch.allclose(out[0], x[0].view(4, 5, 6).mean(1), atol=1e-6)  # size-weighted means


# -------------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("drop", [False, True])
def test_sizes_sources_and_protected_tokens(method, protected, drop):
    g = torch.Generator().manual_seed(protected)
    B, N, keep = 3, 37, 11
    x = torch.randn(B, N, 8, generator=g)
    out, state = mm.reduce_tokens(x, keep=keep, method=method, protected=protected, drop_unselected=drop)
    assert out.shape == (B, keep, 8) and state.size.shape == (B, keep)
    assert torch.equal(state.size.sum(1), torch.full((B,), float(N)))  # sizes sum to N
    for b in range(B):
        members = groups(state.source, b, keep)
        assert sorted(itertools.chain(*members)) == list(range(N))  # disjoint groups covering every token
        assert all(len(m) >= 1 for m in members)
        for p in range(protected):  # protected tokens first, alone and untouched
            assert members[p] == [p]
        assert torch.equal(out[b, :protected], x[b, :protected])
        for j, m in enumerate(members[protected:], start=protected):
            kept = [i for i in m if torch.allclose(out[b, j], x[b, i])]
            if drop or len(m) == 1:  # a dropped group is its kept token's value
                assert kept, "the kept token's value must survive unchanged"
            else:
                assert torch.allclose(out[b, j], x[b, m].mean(0), atol=1e-5)
        # Survivors keep their relative order: groups sorted by their kept token are in position order.


def selected_of(method, x, state, r, **hyper):
    """``[B, M]`` bool: the tokens the matcher selects (with drop_unselected, exactly those keep weight)."""
    plan = mm.plan_merge(x, state, r, method, drop_unselected=True, **hyper)
    return plan.weight[:, state.protected:] > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_unselected_token_joins_its_most_similar_selected_token(method):
    x = torch.randn(2, 24, 6, generator=torch.Generator().manual_seed(3))
    state = mm.init_state(2, 24)
    plan = mm.plan_merge(x, state, 24 - 7, method)
    selected = selected_of(method, x, state, 24 - 7)
    m = torch.nn.functional.normalize(x, dim=-1)
    sim = m @ m.transpose(1, 2)
    pick = max_min_select if method == "divprune" else dpp_select
    for b in range(2):
        chosen = pick(sim[b:b + 1], 7)[0].tolist()
        assert sorted(chosen) == torch.nonzero(selected[b]).flatten().tolist()
        for i in range(24):
            host = max(chosen, key=lambda s: float(sim[b, i, s]))
            assert plan.assign[b, i] == plan.assign[b, host]
        assert len(set(plan.assign[b].tolist())) == 7


def test_drop_unselected_gives_the_values_of_the_selected_tokens_only():
    x = torch.randn(2, 30, 5, generator=torch.Generator().manual_seed(4))
    for method in METHODS:
        plan = mm.plan_merge(x, mm.init_state(2, 30), 20, method, drop_unselected=True)
        assert int((plan.weight == 0).sum()) == 2 * 20
        plan_merge = mm.plan_merge(x, mm.init_state(2, 30), 20, method)
        assert torch.equal(plan.assign, plan_merge.assign)  # same choice, only the fusion differs
        assert bool((plan_merge.weight == 1).all())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("constraint", ["within_frame", "adjacent", "window(2)"])
def test_constraints_are_respected_and_every_removed_token_finds_a_host(method, constraint):
    T, S = 6, 8
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        state0 = video_state(2, T, S, protected=1)
        x = torch.randn(2, state0.num_tokens, 8, generator=g)
        keep = 1 + T + seed  # as few as one token per frame
        rule = mm.parse_constraint(constraint, steps={"t": T})
        _, state = mm.reduce_tokens(x, keep=keep, method=method, constraint=rule, state=state0)
        t0 = state0.coords["t_min"][0]
        for b in range(2):
            for members in groups(state.source, b, keep):
                if 0 in members:
                    assert members == [0]
                    continue
                times = sorted(set(t0[members].tolist()))
                if constraint == "within_frame":
                    assert len(times) == 1
                elif constraint == "adjacent":
                    assert times[-1] - times[0] + 1 == len(times)
                else:
                    assert len({int(t) // 2 for t in times}) == 1


@pytest.mark.parametrize("method", METHODS)
def test_per_frame_budgets_select_inside_each_frame(method):
    T, S = 4, 9
    state = video_state(2, T, S, protected=1)
    x = torch.randn(2, state.num_tokens, 8, generator=torch.Generator().manual_seed(5))
    query = torch.randn(2, 3, 8)
    hyper = {"query": query} if method == "cdpruner" else {}
    plan = mm.plan_merge(x, state, 4 * 6, method, groups=T, **hyper)
    assert plan.num_out == 1 + T * 3
    t = state.coords["t_min"]
    for b in range(2):
        for slot in range(1, plan.num_out):
            members = (plan.assign[b] == slot).nonzero().flatten()
            assert len(t[b, members].unique()) == 1
        assert [int((t[b, plan.assign[b] == s][:1] // 1).item()) for s in range(1, plan.num_out)] == \
            sorted(int(t[b, plan.assign[b] == s][0]) for s in range(1, plan.num_out))


def test_padding_stays_apart_and_costs_at_most_one_kept_token():
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[0, 20:] = False
    for method in METHODS:
        state0 = mm.init_state(2, 30, valid=valid)
        _, state = mm.reduce_tokens(torch.randn(2, 30, 8), keep=10, method=method, state=state0)
        for j in range(10):
            members = state.source[0] == j
            assert valid[0][members].all() or (~valid[0][members]).all()
        assert int((~state.valid[0]).sum()) == 1 and bool(state.valid[1].all())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtype_preserved_zero_vectors_no_nan_and_gradients_flow(method, dtype):
    x = torch.randn(2, 20, 8, dtype=dtype)
    x[0, :5] = 0
    out, _ = mm.reduce_tokens(x, keep=6, method=method)
    assert out.dtype == dtype and torch.isfinite(out).all()
    z = torch.zeros(1, 12, 4, dtype=dtype)
    assert torch.isfinite(mm.reduce_tokens(z, keep=3, method=method)[0]).all()
    y = torch.randn(2, 20, 8, requires_grad=True)
    mm.reduce_tokens(y, keep=6, method=method)[0].sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()


# ------------------------------------------------------------------------------------------------- query
def test_query_pulls_the_selection_towards_relevant_tokens():
    # 16 tokens: 8 near direction e0 (the query's), 8 spread over other directions. Without a query the DPP
    # keeps a diverse set; with the query it keeps more of the e0 tokens, and the most relevant one first.
    g = torch.Generator().manual_seed(0)
    C = 8
    e0 = torch.nn.functional.one_hot(torch.zeros(8, dtype=torch.long), C).float()
    near = e0 + 0.35 * torch.randn(8, C, generator=g)
    far = torch.randn(8, C, generator=g)
    far[:, 0] = -far[:, 0].abs()
    x = torch.cat([far[:4], near[:4], far[4:], near[4:]]).unsqueeze(0)  # interleaved positions
    is_near = torch.tensor([0] * 4 + [1] * 4 + [0] * 4 + [1] * 4, dtype=torch.bool)
    query = torch.nn.functional.one_hot(torch.zeros(1, 1, dtype=torch.long), C).float()
    state = mm.init_state(1, 16)
    kept_plain = selected_of("cdpruner", x, state, 12)[0]
    kept_query = selected_of("cdpruner", x, state, 12, query=query)[0]
    assert int(is_near[kept_query].sum()) > int(is_near[kept_plain].sum())
    assert int(is_near[kept_query].sum()) >= 3
    relevance = query_relevance(x, query)
    assert torch.isclose(relevance.max(), torch.tensor(1.0)) and relevance.min() >= 0
    assert relevance[0, is_near].min() > relevance[0, ~is_near].max()


def test_query_mask_ignores_masked_query_tokens():
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(2))
    q = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[True, False, False], [True, True, False]])
    assert torch.allclose(query_relevance(x, q, mask)[0], query_relevance(x[:1], q[:1, :1])[0])
    assert torch.allclose(query_relevance(x, q, mask)[1], query_relevance(x[1:], q[1:, :2])[0])


def test_two_queries_over_the_same_tokens_keep_different_tokens():
    x = torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(6)).expand(2, -1, -1)
    q = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(7))
    plan = mm.plan_merge(x, mm.init_state(2, 40), 30, "cdpruner", query=q, drop_unselected=True)
    kept = [set(torch.nonzero(plan.weight[b] > 0).flatten().tolist()) for b in range(2)]
    assert kept[0] != kept[1]


# ------------------------------------------------------------------------------------------------ errors
def test_bad_options_name_the_problem():
    x = torch.randn(2, 10, 4)
    state = mm.init_state(2, 10)
    with pytest.raises(ValueError, match="query must be"):
        cdpruner(x, state, 3, query=torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="query must be"):
        cdpruner(x, state, 3, query=torch.randn(3, 3, 4))
    with pytest.raises(ValueError, match="query_mask must be"):
        cdpruner(x, state, 3, query=torch.randn(2, 3, 4), query_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="without a query"):
        cdpruner(x, state, 3, query_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="drop_unselected"):
        mm.plan_merge(x, state, 3, "divprune", drop_unselected="yes")
    with pytest.raises(TypeError, match="query must be"):
        mm.reduce_tokens(x, 4, "cdpruner", query=[1.0])
    with pytest.raises(ValueError, match="takes no option 'query'"):
        mm.reduce_tokens(x, 4, "divprune", query=torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="too large"):
        mm.plan_merge(x, state, 10, "divprune")
    assert torch.equal(divprune(x, state, 0).assign, torch.arange(10).expand(2, -1))
