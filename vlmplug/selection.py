"""One way to name decoder layers and attention heads, shared by every method's parameters.

A selection is 0-based and may be: None or "all" (every one), an int, a list / tuple / range of ints, or a slice
string "a:b", "a:", ":b", "a:b:s" (Python slice semantics). Negative indices count from the end, as in Python.
`check_selection` validates the form when a config is built; `resolve` turns it into sorted indices once the
model (and so the count) is known, with an error naming the method, the parameter and the allowed range.
"""
from __future__ import annotations

from .errors import MethodConfigError

Selection = "None | str | int | list[int] | tuple[int, ...] | range"


def _slice(text: str) -> slice | None:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        return None
    try:
        vals = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        return None
    return slice(*vals)


def check_selection(method: str, param: str, spec) -> None:
    """Raise MethodConfigError unless `spec` has the form of a selection (indices are checked by `resolve`)."""
    if spec is None or spec == "all" or isinstance(spec, range):
        return
    if isinstance(spec, bool):
        pass
    elif isinstance(spec, int):
        return
    elif isinstance(spec, str) and _slice(spec) is not None:
        if _slice(spec).step == 0:
            raise MethodConfigError(f"{method}: {param}={spec!r} has a zero step")
        return
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(x, int) and not isinstance(x, bool) for x in spec):
        return
    raise MethodConfigError(
        f"{method}: {param}={spec!r}; give None or 'all', an index, a non-empty list of indices, or a slice like '2:' "
        "(0-based, negative from the end)"
    )


def resolve(method: str, param: str, spec, n: int, what: str = "decoder layers") -> list[int]:
    """Sorted, unique 0-based indices in range(n) that `spec` names."""
    check_selection(method, param, spec)
    if spec is None or spec == "all":
        return list(range(n))
    if isinstance(spec, str):
        out = list(range(n))[_slice(spec)]
        if not out:
            raise MethodConfigError(f"{method}: {param}={spec!r} selects none of {what} 0..{n - 1}")
        return sorted(set(out))
    items = [spec] if isinstance(spec, int) else list(spec)
    bad = [i for i in items if not -n <= i < n]
    if bad:
        raise MethodConfigError(f"{method}: {param}={spec!r} names {bad}; this model has {what} 0..{n - 1}"
                                f" (negative: from the end)")
    return sorted({i % n for i in items})


def freeze(spec):
    """A selection in hashable, serialisable form (lists become tuples) for frozen configs."""
    return tuple(spec) if isinstance(spec, list) else spec
