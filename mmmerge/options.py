"""The one validation path of an entry point's own options (``patch``'s ``prop_attn``, ``group_budget`` ...).

Matcher options (``margin``, ``temperature`` ...) are checked by ``mmmerge.methods.check_options``; this module
checks what the entry point itself takes, before anything is built or touched:
    flags        every on/off option is a bool (``prop_attn="no"`` is a TypeError naming the option; ``None`` only
                 where it means "the default")
    renamed      options that were renamed say what to use instead
    typos        a name that is neither the entry point's nor the method's option, but close to one of the entry
                 point's (``methd=``), is named as the entry point's typo with the suggestion (``method``); names
                 close to a matcher option, or options of another method, go on to ``check_options``
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Tuple

__all__ = ["check_flag", "check_entry_options", "closest"]


def check_flag(name: str, value: Any, where: str = "", optional: bool = False, default: str = "") -> None:
    """Raise TypeError unless ``value`` is True or False (or None when ``optional``: the default, ``default``)."""
    if isinstance(value, bool) or (optional and value is None):
        return
    allowed = "True, False or None" + (f" ({default})" if default else "") if optional else "True or False"
    prefix = f"{where}: " if where else ""
    raise TypeError(f"{prefix}{name} must be {allowed}, got {value!r} ({type(value).__name__})")


def _parameters(fn: Callable[..., Any]) -> list[str]:
    """The named parameters of ``fn`` a user passes by keyword (the model and **options left out)."""
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]


def check_entry_options(where: str, fn: Callable[..., Any], method: str, options: Mapping[str, Any], *,
                        flags: Optional[Mapping[str, Any]] = None,
                        optional_flags: Optional[Mapping[str, Tuple[Any, str]]] = None,
                        renamed: Optional[Mapping[str, str]] = None, supplied: Sequence[str] = ()) -> None:
    """Check an entry point's own options; matcher options are left to ``check_options``.

    Args:
        where: the entry point's name for messages (``"audio.patch"``).
        fn: the entry point (its keyword parameters are its own options, for suggestions).
        method: the method asked for (its matcher options are not the entry point's typos).
        options: the ``**options`` the entry point got beyond its own parameters.
        flags: ``{name: value}`` of the on/off options: each must be a bool.
        optional_flags: ``{name: (value, what None means)}`` of on/off options where None is the default.
        renamed: ``{old name: what to use}`` for options that were renamed.
        supplied: matcher option names the entry point fills in itself (not offered to the user).
    Raises:
        TypeError for a flag that is not a bool, ValueError for a renamed or misspelled option.
    """
    from .methods import MATCHERS, matcher_options

    for old, new in (renamed or {}).items():
        if old in options:
            raise ValueError(f"{where} takes no option '{old}'; use {new}")
    for name, value in (flags or {}).items():
        check_flag(name, value, where)
    for name, (value, default) in (optional_flags or {}).items():
        check_flag(name, value, where, optional=True, default=default)
    own = _parameters(fn)
    known = isinstance(method, str) and method in MATCHERS
    method_options = [o for o in matcher_options(method) if o not in supplied] if known else []
    elsewhere = {o for m in MATCHERS for o in matcher_options(m)}  # some method's option: check_options says which
    for name in options:
        if name in method_options or name in elsewhere:
            continue
        close = difflib.get_close_matches(name, own + method_options, n=1, cutoff=0.6)
        if close and close[0] in method_options:
            continue  # a misspelled matcher option: check_options names the method and suggests it
        if close:
            raise ValueError(f"{where} has no option '{name}'; did you mean '{close[0]}'?")
        takes = f"; method '{method}' takes: {', '.join(sorted(method_options)) or 'none'}" if known else ""
        raise ValueError(f"{where} has no option '{name}'; its options are: {', '.join(own)}{takes}")


def closest(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``name``, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
