"""mmmerge: training-free token merging for video, audio and vision-language transformers.

The engine (this package) knows tensors, never a model class:
    state.py        TokenState: size, source, coordinates, protected, valid
    matchers.py     where tokens are chosen (tome, pitome, tps, random, prune)
    merge.py        MergePlan and the one merge operation; unmerge
    info.py         MergeInfo: what a merged forward did (one type for every adapter)
    constraints.py  which pairs may merge: static partitions and coordinate rules; the time-mode parser
    schedule.py     r per layer
    attention.py    proportional attention bias
    flops.py        FLOP counting (torch's counter + CPU fused attention)
    reduce.py       plan_merge, merge_tokens, reduce_tokens
Adapters for Hugging Face models live in ``mmmerge.adapters``.
"""
from .attention import size_bias
from .constraints import (Adjacent, AllOf, Constraint, Global, Partition, SameSpan, Window, parse_constraint,
                          parse_time_mode)
from .flops import count_flops
from .info import MergeInfo
from .matchers import (MATCHERS, check_options, energy_score, get_matcher, pitome, prune, random_merge, step_limit,
                       tome, tps)
from .merge import MergePlan, merge_state, merge_tokens, merge_weighted, unmerge
from .patching import last_info, patch, supported_models, unpatch
from .reduce import plan_merge, reduce_tokens
from .schedule import (Grouping, KeepRatio, TargetFlops, TargetTokens, layer_partitions, resolve_schedule,
                       transformer_layer_flops)
from .state import TokenState, init_state

__version__ = "0.1.0"

__all__ = [
    "Adjacent", "AllOf", "check_options", "Constraint", "Grouping", "layer_partitions", "Partition",
    "parse_time_mode", "step_limit", "count_flops", "Global", "KeepRatio", "MATCHERS", "MergePlan", "SameSpan", "TargetFlops",
    "TargetTokens", "TokenState", "Window", "energy_score", "get_matcher", "init_state", "last_info",
    "MergeInfo", "merge_state", "merge_tokens", "merge_weighted", "parse_constraint", "patch", "pitome", "plan_merge",
    "prune", "random_merge", "reduce_tokens", "resolve_schedule", "size_bias", "supported_models", "tome",
    "tps", "transformer_layer_flops", "unmerge", "unpatch",
]
