"""Argument checks shared by every constructor (a ``ValueError`` names the owner, the field, the
value and what is allowed) and the import of optional dependencies (an ``ImportError`` names the
extra to install). The bottom of the package: it imports nothing from moezoo."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["import_extra", "require_float", "require_int", "require_optional_positive"]


def import_extra(module: str, extra: str) -> ModuleType:
    """Import ``module``, which moezoo's ``extra`` (``pip install 'moezoo[extra]'``) provides."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"{module} is needed here; it comes with moezoo's '{extra}' extra: pip install 'moezoo[{extra}]'"
        ) from err


def require_int(owner: str, name: str, value: object, low: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value!r}")
    return value


def require_float(owner: str, name: str, value: object, low: float = 0.0, *, strict: bool = False,
                  below: float | None = None) -> float:
    """``float(value)`` if it is a number (not a bool) >= ``low`` (> with ``strict``) and < ``below``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low) and (below is None or value < below)
    if not ok:
        bound = f"{'>' if strict else '>='} {low}" + ("" if below is None else f" and < {below}")
        raise ValueError(f"{owner}: {name} must be a number {bound}, got {value!r}")
    return float(value)


def require_optional_positive(owner: str, name: str, value: object) -> float | None:
    """None, or a number > 0."""
    return None if value is None else require_float(owner, name, value, 0.0, strict=True)
