"""The table of method facts: every method by name, how it removes tokens (what one step can always remove), the
static tables it reads, which methods choose over all tokens or on the tokens themselves, and the one check of
their options.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .constraints import Constraint, Guarantee, Partition, first_positions, padded_guarantee
from .matchers import (PITOME_PRESETS, TOME_PARITIES, TPS_PRESETS, _a_counts, no_merge, pitome, prune, random_merge,
                       tome, tps)
from .merge import MergePlan
from .selection import WHOLE_SET_METHODS, cdpruner, check_partitionable, divprune, dominant  # noqa: F401
from .state import TokenState

MATCHERS: Dict[str, Callable[..., MergePlan]] = {
    "tome": tome,
    "pitome": pitome,
    "tps": tps,
    "random": random_merge,
    "prune": prune,
    "none": no_merge,
    "dominant": dominant,
    "divprune": divprune,
    "cdpruner": cdpruner,
}

# How a method removes tokens, for step_limit: bipartite pairs, PiToMe's candidates, or select-and-assign.
METHOD_KINDS: Dict[str, str] = {"tome": "bipartite", "random": "bipartite", "pitome": "pitome", "tps": "select",
                                "prune": "select", "none": "none", "dominant": "select", "divprune": "select",
                                "cdpruner": "select"}
# Methods that measure similarity on the tokens being reduced themselves, never on a separate metric (keys).
SELF_METRIC_METHODS = frozenset({"divprune", "cdpruner"})


# ------------------------------------------------------------------------------------------ step limits
def _odd_runs(mergeable: int, runs: int) -> int:
    """Most runs of odd length that ``runs`` runs of ``mergeable`` tokens in total can have."""
    runs = min(runs, mergeable)
    return runs if (runs - mergeable) % 2 == 0 else runs - 1


def step_limit(method: str, mergeable: int, guarantee: Guarantee = Guarantee()) -> int:
    """Largest r one step of ``method`` can always remove from ``mergeable`` tokens with this guarantee.

    bipartite (tome, random): a run of m tokens gives floor(m / 2) A tokens with a neighbour B;
    pitome: 2r candidates besides one anchor per clique (none needed for a single clique);
    select-style (tps, prune, ...): everything but one anchor per clique.
    """
    kind = METHOD_KINDS.get(method, "select")
    if kind == "none" or mergeable <= 0:
        return 0
    if kind == "bipartite":
        return (mergeable - _odd_runs(mergeable, guarantee.runs)) // 2
    if kind == "pitome":
        return mergeable // 2 if guarantee.cliques <= 1 else max(mergeable - guarantee.cliques, 0) // 2
    return max(mergeable - guarantee.cliques, 0)


def group_limits(method: str, sizes: Sequence[int], guarantees: Sequence[Guarantee]) -> Tuple[int, ...]:
    """``step_limit`` of every group of a partition."""
    return tuple(step_limit(method, n, g) for n, g in zip(sizes, guarantees))


def _check_r(r: int, limit: int, mergeable: int, method: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    if r > limit:
        raise ValueError(f"{method}: r={r} is too large: {mergeable} mergeable tokens allow at most r={limit} in "
                         "one step under this constraint")


def check_step(method: str, r: int, state: TokenState, constraint: Constraint,
               partition: Optional[Partition]) -> None:
    """Raise ValueError unless one step of ``method`` can remove ``r`` tokens for every input of this shape.

    With padding (``state.valid``) the mask is read on the host once (engine calls only)."""
    M = state.num_tokens - state.protected
    if partition is None:
        valid = None if state.valid is None else state.valid[:, state.protected:]
        _check_r(r, step_limit(method, M, padded_guarantee(constraint, valid)), M, method)
        return
    if sum(partition.sizes) != M:
        raise ValueError(f"the partition covers {sum(partition.sizes)} tokens but there are {M} mergeable tokens")
    if r != partition.removed:
        raise ValueError(f"r={r} differs from the partition's budgets {partition.budgets} (sum {partition.removed})")
    limits = group_limits(method, partition.sizes, partition.group_guarantees())
    for g, (n, budget, limit) in enumerate(zip(partition.sizes, partition.budgets, limits)):
        if budget > limit:
            raise ValueError(f"{method}: group {g} has {n} tokens and can give up at most {limit} in one step, "
                             f"not {budget}")


def group_tables(method: str, partition: Partition, a0: int = 0) -> Dict[str, Tensor]:
    """The static index tensors ``method`` reads for ``partition`` (``GroupTables`` names), made once at patch
    time (``a0``: the first A token of a bipartite split, ``a_first``)."""
    ids = torch.repeat_interleave(torch.arange(partition.num_groups), torch.tensor(partition.sizes))
    tables = {"ids": ids}
    kind = METHOD_KINDS.get(method, "select")
    if kind == "bipartite":
        tables["ids_a"] = ids[a0::2].clone()
        tables["block_ab"] = tables["ids_a"].unsqueeze(1) != ids[1 - a0::2].unsqueeze(0)  # [Na, Nb] forbidden
        tables["sel_a"] = first_positions(_a_counts(partition, a0)[0], partition.budgets)
    elif kind == "pitome":
        tables["sel_pairs"] = first_positions(partition.sizes, [2 * b for b in partition.budgets])
        pair_ids = torch.repeat_interleave(torch.arange(partition.num_groups), torch.tensor(partition.budgets))
        tables["block_pairs"] = pair_ids.unsqueeze(1) != pair_ids.unsqueeze(0)
    else:
        tables["sel"] = first_positions(partition.sizes, partition.budgets)
        tables["quota"] = torch.tensor(partition.after())[ids]  # greedy selections: tokens each group keeps
    return tables


def get_matcher(method: str) -> Callable[..., MergePlan]:
    if not isinstance(method, str) or method not in MATCHERS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(MATCHERS)}")
    return MATCHERS[method]


# ------------------------------------------------------------------------------------------ options
def _number(name: str, positive: bool = False) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {value!r}")
        if positive and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    return check


def _choice(name: str, choices: Sequence[str]) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in choices:
            raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return check


def _optional(check: Callable[[Any], None]) -> Callable[[Any], None]:
    def optional(value: Any) -> None:
        if value is not None:
            check(value)
    return optional


def _instance(name: str, cls: type, what: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and not isinstance(value, cls):
            raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return check


def _positive_int(name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return check


# Value checks of every matcher option (the names come from the matcher's signature); each raises
# TypeError (wrong type) or ValueError (bad value).
OPTION_CHECKS: Dict[str, Callable[[Any], None]] = {
    "margin": _optional(_number("margin")),
    "alpha": _number("alpha", positive=True),
    "temperature": _number("temperature", positive=True),
    "generator": _instance("generator", torch.Generator, "a torch.Generator"),
    "score": _instance("score", Tensor, "a [B, N] tensor"),
    "noise": _instance("noise", Tensor, "a [B, N] tensor of uniform draws"),
    "layer_idx": _number("layer_idx"),
    "num_layers": _number("num_layers", positive=True),
    "contextual": _positive_int("contextual"),
    "parity": _choice("tome parity", TOME_PARITIES),
}
# Checks of options whose values depend on the method (each method's own presets).
METHOD_OPTION_CHECKS: Dict[Tuple[str, str], Callable[[Any], None]] = {
    ("pitome", "preset"): _choice("pitome preset", tuple(PITOME_PRESETS)),
    ("tps", "preset"): _choice("tps preset", tuple(TPS_PRESETS)),
}
# Passed by the caller (plan_merge, the encoder patch), never options of their own.
SUPPLIED = ("metric", "state", "r", "constraint", "partition", "quota")


def matcher_options(method: str) -> Tuple[str, ...]:
    """Option names ``method`` accepts (besides metric, state, r, constraint, partition)."""
    params = inspect.signature(get_matcher(method)).parameters
    return tuple(name for name, p in params.items() if name not in SUPPLIED
                 and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))


def check_options(method: str, options: Mapping[str, Any], supplied: Sequence[str] = ()) -> None:
    """The one validation path of matcher options: unknown names raise ValueError (a typo such as ``margn=``
    is never ignored), bad values ValueError, values of the wrong type TypeError. ``supplied``: names the
    caller fills in itself (not offered to the user in the message)."""
    known = matcher_options(method)
    unknown = sorted(set(options) - set(known))
    if unknown:
        users = sorted(k for k in known if k not in supplied)
        from .options import closest

        raise ValueError(f"method '{method}' takes no option {', '.join(map(repr, unknown))}; "
                         f"its options are: {', '.join(users) or 'none'}{closest(unknown[0], users)}")
    for name, value in options.items():
        check = METHOD_OPTION_CHECKS.get((method, name), OPTION_CHECKS.get(name))
        if check is not None:
            try:
                check(value)
            except (TypeError, ValueError) as err:
                raise type(err)(f"method '{method}': {err}") from None


def _flag(name: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
    return check


OPTION_CHECKS["query"] = _instance("query", Tensor, "a [B, Q, C] tensor")
OPTION_CHECKS["query_mask"] = _instance("query_mask", Tensor, "a [B, Q] bool tensor")
OPTION_CHECKS["drop_unselected"] = _flag("drop_unselected")
