"""mmmerge: training-free token merging for video, audio and vision-language transformers.

The engine (this package) knows tensors, never a model class:
    state.py        TokenState: size, source, coordinates, protected, valid
    matchers.py     where tokens are chosen (tome, pitome, tps, random, prune)
    selection.py    ... or kept as they are (dominant, divprune, cdpruner)
    methods.py      the table of method facts: names, step limits, static tables, the one check of options
    merge.py        MergePlan and the one merge operation; unmerge
    fused.py        the same choose-and-merge as two custom ops (tome, pitome, tps without a coordinate rule)
    triton_kernels.py  their CUDA kernels; kernel_check.py checks them against the PyTorch references
    fused_selection.py  dominant's fused step (one plan op and merge_slots); triton_selection.py its kernels
    info.py         MergeInfo: what a merged forward did (one type for every adapter)
    constraints.py  which pairs may merge: static partitions and coordinate rules; the time-mode parser
    schedule.py     r per layer
    attention.py    proportional attention bias
    flops.py        FLOP counting (torch's counter + CPU fused attention) and op counting
    reduce.py       plan_merge, merge_tokens, reduce_tokens; plan_rows (rows of their own keeps in one batch)
    rows.py         RowBudgets and the per-row quotas the matchers take (padding absorbs the rest)
    options.py      the one check of an entry point's own options (bools, typos with a suggestion)
Adapters for Hugging Face models live in ``mmmerge.adapters``.
"""
from .attention import size_bias
from .constraints import (Adjacent, AllOf, Constraint, Global, GroupTables, Partition, SameSpan, Window,
                          parse_constraint, parse_time_mode)
from .flops import count_bytes, count_flops, count_ops
from .info import MergeInfo
from .matchers import energy_score, pitome, prune, random_merge, tome, tps
from .methods import MATCHERS, check_options, get_matcher, group_tables, step_limit
from .merge import MergePlan, merge_state, merge_tokens, merge_weighted, unmerge
from .patching import last_info, patch, supported_models, unpatch
from .reduce import plan_merge, plan_rows, reduce_tokens
from .rows import RowBudgets
from .schedule import (Grouping, KeepRatio, TargetFlops, TargetTokens, layer_partitions, resolve_schedule,
                       transformer_layer_flops)
from .selection import cdpruner, divprune, dominant
from .state import TokenState, init_state

__version__ = "0.1.0"

__all__ = [
    "Adjacent", "AllOf", "cdpruner", "check_options", "Constraint", "count_bytes", "count_flops", "count_ops", "divprune",
    "dominant", "energy_score", "get_matcher", "Global", "Grouping", "group_tables", "GroupTables", "init_state", "KeepRatio", "last_info",
    "layer_partitions", "MATCHERS", "merge_state", "merge_tokens", "merge_weighted", "MergeInfo", "MergePlan",
    "parse_constraint", "parse_time_mode", "Partition", "patch", "pitome", "plan_merge", "plan_rows", "prune",
    "random_merge", "reduce_tokens", "RowBudgets", "resolve_schedule", "SameSpan", "size_bias", "step_limit",
    "supported_models", "TargetFlops", "TargetTokens", "TokenState", "tome", "tps", "transformer_layer_flops",
    "unmerge", "unpatch", "Window",
]
