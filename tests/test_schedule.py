import pytest

import mmmerge as mm
from mmmerge.schedule import schedule_flops, tokens_per_layer


def test_int_and_inflect_and_list():
    assert mm.resolve_schedule(4, 3, 50, 1) == [4, 4, 4]
    # ToMe's parse_r: min = int(r * (1 - inflect)), max = 2r - min, linear in between (values worked by hand).
    assert mm.resolve_schedule((8, -0.5), 5, 200) == [12, 10, 8, 6, 4]
    assert mm.resolve_schedule((8, 0.5), 5, 200) == [4, 6, 8, 10, 12]
    assert mm.resolve_schedule((8, 0.0), 4, 200) == [8, 8, 8, 8]
    assert mm.resolve_schedule([0, 3, 5], 3, 50) == [0, 3, 5]
    assert mm.resolve_schedule((0, 3, 5), 3, 50) == [0, 3, 5]


def test_inflect_given_as_int_gets_a_hint():
    with pytest.raises(ValueError, match="inflect as a float"):
        mm.resolve_schedule((8, 0), 12, 200)


def test_keep_ratio_and_target_tokens():
    sched = mm.resolve_schedule(mm.KeepRatio(0.9), 4, 101, 1)
    # mergeable 100 -> keep 90 (r 10) -> 81 (r 9) -> 73 (r 8) -> 66 (r 7)
    assert sched == [10, 9, 8, 7]
    assert mm.resolve_schedule(mm.KeepRatio(1.0), 3, 101, 1) == [0, 0, 0]
    # Bipartite methods cap each layer at half the mergeable tokens; tps can go further.
    assert mm.resolve_schedule(mm.KeepRatio(0.1), 2, 101, 1) == [50, 25]
    assert mm.resolve_schedule(mm.KeepRatio(0.1), 2, 101, 1, method="tps") == [90, 9]
    sched = mm.resolve_schedule(mm.TargetTokens(41), 6, 101, 1)
    assert sched == [10] * 6 and tokens_per_layer(sched, 101)[-1] == 41
    sched = mm.resolve_schedule(mm.TargetTokens(45), 4, 101, 1)
    assert sched == [14, 14, 14, 14]
    sched = mm.resolve_schedule(mm.TargetTokens(47), 4, 101, 1)
    assert sched == [14, 14, 13, 13] and tokens_per_layer(sched, 101)[-1] == 47
    with pytest.raises(ValueError, match="TargetTokens"):
        mm.resolve_schedule(mm.TargetTokens(1), 4, 101, 1)
    with pytest.raises(ValueError, match="KeepRatio"):
        mm.resolve_schedule(mm.KeepRatio(0.0), 4, 101, 1)


def test_target_flops_meets_the_fraction():
    cost = mm.transformer_layer_flops(64)
    sched = mm.resolve_schedule(mm.TargetFlops(0.5), 12, 1569, 1, layer_flops=cost)
    frac = schedule_flops(sched, 1569, cost) / schedule_flops([0] * 12, 1569, cost)
    assert frac <= 0.5
    smaller = [sched[0] - 1] * 12
    assert schedule_flops(smaller, 1569, cost) / schedule_flops([0] * 12, 1569, cost) > 0.5


def test_groups_share_any_r_unevenly_and_stay_balanced():
    grouping = mm.Grouping(sizes=(40,) * 8)
    sched = mm.resolve_schedule(mm.TargetTokens(1 + 8 * 20), 4, 1 + 8 * 40, 1, grouping=grouping)
    assert sched == [40, 40, 40, 40]
    parts = mm.layer_partitions([12, 12, 12, 12], 1 + 8 * 40, 1, "tome", grouping)
    assert [p.budgets for p in parts[:2]] == [(2, 2, 2, 2, 1, 1, 1, 1), (1, 1, 1, 1, 2, 2, 2, 2)]
    assert parts[2].sizes == (37,) * 8  # after two layers of 12 every group lost 3
    # each group stays feasible on its own: at most half of a group per bipartite step
    with pytest.raises(ValueError, match="layer 0: r=161 is infeasible"):
        mm.resolve_schedule([161, 0, 0, 0], 4, 1 + 8 * 40, 1, grouping=grouping)


def test_guarantees_bound_what_a_step_can_always_remove():
    G = mm.constraints.Guarantee
    assert mm.step_limit("tome", 64) == 32 and mm.step_limit("tps", 64) == 63
    assert mm.step_limit("tome", 64, G(runs=4, cliques=4)) == 30  # four runs of even length lose nothing
    assert mm.step_limit("tome", 63, G(runs=4, cliques=4)) == 30  # three odd runs: (63 - 3) / 2
    assert mm.step_limit("tps", 64, G(runs=4, cliques=8)) == 56 and mm.step_limit("pitome", 64, G(1, 8)) == 28
    assert mm.step_limit("tome", 5, G(runs=9)) == 0  # every token alone in its run


def test_infeasible_schedules_raise_with_the_limit():
    with pytest.raises(ValueError, match="largest constant r"):
        mm.resolve_schedule(30, 4, 50, 1)
    with pytest.raises(ValueError, match="layer 1"):
        mm.resolve_schedule([10, 30], 2, 50)
    with pytest.raises(ValueError, match="r must be >= 0"):
        mm.resolve_schedule(-1, 2, 50)
    with pytest.raises(ValueError, match="one r per layer"):
        mm.resolve_schedule([1, 2], 3, 50)
    with pytest.raises(ValueError, match="out of reach"):
        mm.resolve_schedule(mm.TargetFlops(0.01), 2, 50, layer_flops=mm.transformer_layer_flops(8))
    assert mm.resolve_schedule(7, 3, 50, method="none") == [0, 0, 0]


def test_target_flops_falls_back_to_keep_ratio_when_constant_r_cannot_reach():
    cost = mm.transformer_layer_flops(768)
    # 1214 tokens over 12 layers: the best constant r stays just above 50% of the FLOPs (AST-base).
    top = mm.schedule._constant_feasible(12, 1214, 2, "tome")
    base = mm.schedule.schedule_flops([0] * 12, 1214, cost)
    assert mm.schedule.schedule_flops([top] * 12, 1214, cost) > 0.45 * base
    sched = mm.resolve_schedule(mm.TargetFlops(0.45), 12, 1214, 2, layer_flops=cost)
    assert mm.schedule.schedule_flops(sched, 1214, cost) <= 0.45 * base
    assert len(set(sched)) > 1 and sched[0] > sched[-1]  # a keep-ratio schedule: more removed early
    mm.schedule.validate_schedule(sched, 1214, 2, "tome")
