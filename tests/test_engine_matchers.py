"""Matchers against plain loop references written here: PiToMe (energy, presets), TPS, random, prune."""
import math

import pytest
import torch
import torch.nn.functional as F

import mmmerge as mm
from mmmerge.matchers import PITOME_PRESETS, pitome_margin


def kernel(x, margin, alpha, shift):
    """PiToMe's energy kernel for one cosine value (Python floats)."""
    if shift:  # elu(x - m, alpha)
        return x - margin if x - margin > 0 else alpha * (math.exp(x - margin) - 1.0)
    return x if x >= margin else alpha * (math.exp(x - margin) - 1.0)  # paper, Eq. 4


def cosines(x):
    """``[M, C]`` -> ``M x M`` list of cosines in float64."""
    m = x.double()
    norm = m.norm(dim=-1).clamp_min(1e-12)
    return ((m @ m.T) / norm[:, None] / norm[None, :]).tolist()


def grouped_output(x, target, weight, protected):
    """Outputs of "token i goes to target[i]" with fusion weights, survivors (targets) in their order."""
    groups = {}
    for i, t in enumerate(target):
        groups.setdefault(t, []).append(i)
    ordered = [groups[k] for k in sorted(groups)]
    rows = [x[p].double() for p in range(protected)]
    sizes = [1.0] * protected
    for g in ordered:
        w = torch.tensor([weight[i] for i in g], dtype=torch.float64)
        rows.append((w[:, None] * x[protected + torch.tensor(g)].double()).sum(0) / w.sum())
        sizes.append(float(len(g)))
    return torch.stack(rows), torch.tensor(sizes, dtype=torch.float64)


def reference_pitome(x, r, protected, margin, alpha=1.0, shift=False):
    """One PiToMe step with loops: energy, the 2r most redundant tokens alternate into A and B, A -> best B."""
    outs, sizes = [], []
    for b in range(x.shape[0]):
        sim = cosines(x[b, protected:])
        M = len(sim)
        energy = [sum(kernel(s, margin, alpha, shift) for s in row) / M for row in sim]
        order = sorted(range(M), key=lambda i: -energy[i])
        a_set, b_set = order[: 2 * r : 2], order[1 : 2 * r : 2]
        target = list(range(M))
        for a in a_set:
            target[a] = max(b_set, key=lambda j: sim[a][j])
        y, s = grouped_output(x[b], target, [1.0] * M, protected)
        outs.append(y)
        sizes.append(s)
    return torch.stack(outs), torch.stack(sizes)


def reference_tps(x, r, protected, score, temperature):
    """One TPS step with loops: drop the r lowest scores, squeeze each into its most similar kept token."""
    outs, sizes = [], []
    for b in range(x.shape[0]):
        sim = cosines(x[b, protected:])
        M = len(sim)
        imp = score[b, protected:].tolist()
        removed = sorted(range(M), key=lambda i: imp[i])[:r]
        kept = [i for i in range(M) if i not in removed]
        target, weight = list(range(M)), [1.0] * M
        for i in removed:
            host = max(kept, key=lambda j: sim[i][j])
            target[i] = host
            weight[i] = math.exp((sim[i][host] - 1.0) / temperature)
        y, s = grouped_output(x[b], target, weight, protected)
        outs.append(y)
        sizes.append(s)
    return torch.stack(outs), torch.stack(sizes)


# ------------------------------------------------------------------------------------------ PiToMe
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("margin,alpha", [(0.9, 1.0), (0.3, 0.5), (-0.2, 2.0)])
def test_energy_score_matches_the_formula(shift, margin, alpha):
    torch.manual_seed(0)
    x = torch.randn(2, 9, 5)
    x[1, 2] = x[1, 5] * 3  # a parallel pair: cosine 1, above any margin
    m = F.normalize(x, dim=-1)
    got = mm.energy_score(m, margin, alpha, shift)
    for b in range(2):
        sim = cosines(x[b])
        expected = [sum(kernel(s, margin, alpha, shift) for s in row) / 9 for row in sim]
        torch.testing.assert_close(got[b].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_energy_score_leaves_padding_out_of_the_mean():
    torch.manual_seed(1)
    m = F.normalize(torch.randn(1, 8, 4), dim=-1)
    valid = torch.tensor([[True] * 5 + [False] * 3])
    got = mm.energy_score(m, 0.5, valid=valid)
    expected = mm.energy_score(m[:, :5], 0.5)
    torch.testing.assert_close(got[:, :5], expected)


def test_pitome_margin_presets():
    # paper and official: 0.9 - 0.9 l / L; official_deit: 0.9 - 0.8 l / L (official code's DeiT patch).
    assert pitome_margin(0, 12) == pytest.approx(0.9)
    assert pitome_margin(6, 12) == pytest.approx(0.45)
    assert pitome_margin(6, 12, 0.9, 0.8) == pytest.approx(0.5)
    assert pitome_margin(11, 12, 0.9, 0.8) == pytest.approx(0.9 - 0.8 * 11 / 12)
    assert set(PITOME_PRESETS) == {"paper", "official", "official_deit"}
    assert PITOME_PRESETS["paper"]["shift"] is False and PITOME_PRESETS["official"]["shift"] is True


@pytest.mark.parametrize("B,N,r,protected", [(1, 12, 3, 0), (2, 21, 6, 1), (3, 30, 14, 2), (2, 40, 1, 0)])
@pytest.mark.parametrize("preset,layer", [("paper", 0), ("paper", 7), ("official", 7), ("official_deit", 7)])
def test_pitome_matches_reference_implementation(B, N, r, protected, preset, layer):
    torch.manual_seed(B * 1000 + N + layer)
    x = torch.randn(B, N, 6)
    x[:, protected + 1] = x[:, protected + 3]  # a duplicate: high energy, surely a candidate
    # Written out here, independent of the library: (energy shift, margin at layer l of L).
    shift, margin = {
        "paper": (False, 0.9 - 0.9 * layer / 12),          # the paper's f_m and margin schedule
        "official": (True, 0.9 - 0.9 * layer / 12),        # official code: elu(x - m), MAE/CLIP schedule
        "official_deit": (True, 0.9 - 0.8 * layer / 12),   # official code: DeiT schedule
    }[preset]
    state = mm.init_state(B, N, protected=protected)
    plan = mm.plan_merge(x, state, r, "pitome", preset=preset, layer_idx=layer, num_layers=12)
    y, s = mm.merge_tokens(x, state, plan)
    ref_y, ref_size = reference_pitome(x, r, protected, margin, shift=shift)
    torch.testing.assert_close(y.double(), ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.size.double(), ref_size)


def test_pitome_margin_argument_overrides_the_preset_and_changes_the_choice():
    torch.manual_seed(2)
    x = torch.randn(1, 40, 6)
    state = mm.init_state(1, 40)
    outs = {}
    for margin in (0.9, -0.5):
        y, _ = mm.merge_tokens(x, state, mm.plan_merge(x, state, 8, "pitome", margin=margin))
        ref, _ = reference_pitome(x, 8, 0, margin)
        torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
        outs[margin] = y
    assert not torch.equal(outs[0.9], outs[-0.5]), "the margin must matter for this input"


def test_pitome_protects_low_energy_tokens():
    torch.manual_seed(3)
    M, r = 30, 5
    x = torch.randn(1, M, 8)
    state = mm.init_state(1, M)
    y, s = mm.merge_tokens(x, state, mm.plan_merge(x, state, r, "pitome", margin=0.5))
    sim = cosines(x[0])
    energy = torch.tensor([sum(kernel(v, 0.5, 1.0, False) for v in row) / M for row in sim])
    low = energy.argsort()[: M - 2 * r].tolist()  # outside the 2r most redundant: never candidates
    for i in low:
        j = s.source[0, i]
        assert s.size[0, j] == 1, f"low-energy token {i} was merged"
        torch.testing.assert_close(y[0, j], x[0, i])
    assert s.num_tokens == M - r


def test_pitome_unknown_preset():
    x = torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match="unknown pitome preset 'tome'"):
        mm.plan_merge(x, mm.init_state(1, 10), 2, "pitome", preset="tome")


# --------------------------------------------------------------------------------------------- TPS
@pytest.mark.parametrize("temperature", [1.0, 0.1, 5.0])
@pytest.mark.parametrize("B,N,r,protected", [(1, 10, 3, 0), (2, 25, 20, 1), (3, 16, 8, 2)])
def test_tps_matches_reference_implementation(B, N, r, protected, temperature):
    torch.manual_seed(N + r)
    x = torch.randn(B, N, 6)
    score = torch.rand(B, N)
    state = mm.init_state(B, N, protected=protected)
    plan = mm.plan_merge(x, state, r, "tps", score=score, temperature=temperature)
    y, s = mm.merge_tokens(x, state, plan)
    ref_y, ref_size = reference_tps(x, r, protected, score, temperature)
    torch.testing.assert_close(y.double(), ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.size.double(), ref_size)


def test_tps_default_importance_removes_the_most_redundant_tokens():
    torch.manual_seed(4)
    x = torch.randn(1, 20, 8)
    cluster = [2, 5, 7, 11, 12, 17]  # six near-duplicates: by far the highest energy
    x[0, cluster] = torch.randn(8) + 1e-3 * torch.randn(6, 8)
    state = mm.init_state(1, 20)
    _, s = mm.merge_tokens(x, state, mm.plan_merge(x, state, 5, "tps"))
    # Five of the six were removed and squeezed into the sixth; everything else is untouched.
    assert len(set(s.source[0, cluster].tolist())) == 1 and s.size[0, s.source[0, 2]] == 6
    assert sorted(s.size[0].tolist()) == [1.0] * 14 + [6.0]


def test_tps_bad_temperature_and_score_shape():
    x = torch.randn(1, 10, 4)
    state = mm.init_state(1, 10)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        mm.plan_merge(x, state, 2, "tps", temperature=0.0)
    with pytest.raises(ValueError, match="score must be"):
        mm.plan_merge(x, state, 2, "tps", score=torch.rand(1, 9))


# ------------------------------------------------------------------------------------------ random
def test_random_merge_is_reproducible_with_a_generator_and_varies_without_one():
    x = torch.randn(2, 30, 4)
    state = mm.init_state(2, 30, protected=1)

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return mm.plan_merge(x, state, 10, "random", generator=g).assign

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))
    a = run(0)
    assert torch.all(a[:, 0] == 0) and torch.all(a.max(1).values == 30 - 10 - 1)


def test_random_merge_ignores_similarity():
    # tome on this input always pairs the duplicates; random does not depend on the metric at all.
    x = torch.randn(1, 20, 4)
    state = mm.init_state(1, 20)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    p1 = mm.plan_merge(x, state, 5, "random", generator=g1)
    p2 = mm.plan_merge(torch.randn(1, 20, 4), state, 5, "random", generator=g2)
    assert torch.equal(p1.assign, p2.assign)


@pytest.mark.parametrize("method", ["tps", "prune"])
@pytest.mark.parametrize("constraint", ["window(2)", "adjacent", "within_frame"])
def test_select_and_assign_keeps_a_host_when_a_whole_block_is_least_important(method, constraint):
    # 8 frames x 4 tokens; the 8 tokens of frames 0-1 (one window(2) block) are the least important, so
    # removing the r=10 lowest would leave frame 0's tokens with no allowed kept host in any of these modes.
    frames, per_frame = 8, 4
    t = torch.arange(frames).repeat_interleave(per_frame).float()
    state = mm.init_state(1, frames * per_frame, coords={"t_min": t, "t_max": t}, rules={"t_min": "min", "t_max": "max"})
    score = torch.where(t < 2, 0.0, 1.0 + torch.arange(len(t)) / len(t)).unsqueeze(0)
    r = 10
    rule = mm.parse_constraint(constraint, steps={"t": frames})
    plan = mm.plan_merge(torch.randn(1, len(t), 8), state, r, method, rule, score=score)
    assert plan.num_out == len(t) - r
    groups = {}
    for i, a in enumerate(plan.assign[0].tolist()):
        groups.setdefault(a, []).append(int(t[i]))
    for members in groups.values():
        if constraint == "window(2)":
            assert len({f // 2 for f in members}) == 1
        elif constraint == "within_frame":
            assert len(set(members)) == 1
        else:
            assert max(members) - min(members) <= 2  # spans stay contiguous; one step joins touching frames
    if method == "prune":  # dropped tokens carry weight 0: each clique (frame, or block) keeps its best token
        dropped = plan.weight[0] == 0
        assert int(dropped[: 2 * per_frame].sum()) == (2 * per_frame - 1 if constraint == "window(2)" else 2 * per_frame - 2)
        assert int(dropped.sum()) == r


@pytest.mark.parametrize("constraint", ["window(2)", "within_frame"])
def test_pitome_under_a_constraint_always_finds_an_allowed_host(constraint):
    # 8 frames x 4 tokens, r=12: up to 24 candidates. Each frame (window) keeps its lowest-energy token out
    # of the candidates, so every A token has an allowed destination whatever the energies are.
    frames, per_frame = 8, 4
    t = torch.arange(frames).repeat_interleave(per_frame).float()
    state = mm.init_state(2, frames * per_frame, coords={"t_min": t, "t_max": t}, rules={"t_min": "min", "t_max": "max"})
    for seed in range(25):
        metric = torch.randn(2, len(t), 6, generator=torch.Generator().manual_seed(seed))
        plan = mm.plan_merge(metric, state, 12, "pitome", mm.parse_constraint(constraint, steps={"t": frames}))
        for b in range(2):
            blocks = {}
            for i, a in enumerate(plan.assign[b].tolist()):
                blocks.setdefault(a, set()).add(int(t[i]) // (2 if constraint == "window(2)" else 1))
            assert all(len(v) == 1 for v in blocks.values())


# ----------------------------------------------------------------------------- ToMe's A/B parity preset
def _official_tome_pairs(metric: torch.Tensor, r: int) -> set:
    """(removed token, host token) pairs of the official ToMe bipartite step with a [CLS] token (its A row
    masked), written from the paper's code: A/B alternate over all tokens."""
    m = metric / metric.norm(dim=-1, keepdim=True)
    a, b = m[..., ::2, :], m[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -math.inf
    node_max, node_idx = scores.max(dim=-1)
    src = node_max.argsort(dim=-1, descending=True)[..., :r]
    dst = node_idx.gather(-1, src)
    return {(2 * int(s), 2 * int(d) + 1) for s, d in zip(src[0], dst[0])}


@pytest.mark.parametrize("n, r", [(5, 1), (5, 2), (12, 4), (197, 16)])
def test_official_parity_reproduces_the_official_tome_step_with_a_cls_token(n, r):
    metric = torch.randn(1, n, 16, generator=torch.Generator().manual_seed(n))
    state = mm.init_state(1, n, protected=1)
    plan = mm.tome(metric, state, r, parity="official")
    pairs = _official_tome_pairs(metric, r)
    assign = plan.assign[0]
    kept = set(plan.kept[0].tolist())
    for src, dst in pairs:
        assert src not in kept and dst in kept and assign[src] == assign[dst]
    assert plan.num_out == n - r


def test_the_default_parity_starts_a_at_the_first_mergeable_token():
    metric = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(0))
    state = mm.init_state(1, 5, protected=1)
    # Token 1 is an A token by default (merges into a B token), a B token under the official parity.
    assert 1 not in set(mm.tome(metric, state, 2).kept[0].tolist())
    assert 1 in set(mm.tome(metric, state, 2, parity="official").kept[0].tolist())
    with pytest.raises(ValueError, match="parity"):
        mm.check_options("tome", {"parity": "odd"})
