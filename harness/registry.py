"""Registries of methods and suites, fed by entry points.

Built-ins register through this project's own pyproject, exactly like plugins do, so there is
one path for both. Each entry is loaded on demand and its import error is kept, not raised:
a broken plugin shows up in `harness list` and fails only a command that asks for it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from harness.errors import HarnessError

METHODS = "harness.methods"
SUITES = "harness.suites"


@dataclass
class Entry:
    name: str
    group: str
    target: str  # "module:attr" as declared
    distribution: str  # the package that declared it
    obj: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _kind(group: str) -> str:
    return "method" if group == METHODS else "suite"


@cache
def _entry(group: str, name: str) -> Entry:
    for ep in entry_points(group=group):
        if ep.name == name:
            dist = ep.dist.name if ep.dist is not None else "?"
            entry = Entry(name, group, ep.value, dist)
            try:
                entry.obj = ep.load()
            except Exception as exc:  # a plugin can fail in any way; keep the message
                entry.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
            return entry
    raise KeyError(name)


def names(group: str) -> list[str]:
    return sorted({ep.name for ep in entry_points(group=group)})


def entries(group: str) -> list[Entry]:
    """Every registered entry of a group, loaded; broken ones carry their error."""
    return [_entry(group, name) for name in names(group)]


def describe(entry: Entry) -> dict[str, Any]:
    """What `harness list` and the leaderboard's cards show of an entry: name, status, families,
    parameters [(name, type, default)], reference (paper or description), summary, package."""
    from harness import params

    card: dict[str, Any] = {
        "name": entry.name,
        "kind": _kind(entry.group),
        "package": entry.distribution,
        "target": entry.target,
        "status": "ok" if entry.ok else f"broken: {entry.error}",
        "families": (),
        "parameters": [],
        "reference": "",
        "summary": "",
    }
    if not entry.ok:
        return card
    obj = entry.obj
    card["families"] = tuple(getattr(obj, "families", ()))
    try:
        card["parameters"] = params.describe(obj)
    except Exception as exc:  # a plugin class that is not a dataclass
        card["status"] = f"ok (parameters unreadable: {type(exc).__name__})"
    card["reference"] = getattr(obj, "paper", "") or getattr(obj, "description", "")
    doc = obj.__doc__ or ""
    if doc.startswith(f"{getattr(obj, '__name__', '')}("):  # the signature a dataclass writes when none is given
        doc = getattr(sys.modules.get(getattr(obj, "__module__", "")), "__doc__", None) or ""
    card["summary"] = " ".join(doc.strip().split("\n\n")[0].split())
    return card


def require(group: str, name: str) -> None:
    """A one-line HarnessError unless `name` is registered in `group` (reads the entry points
    only: nothing is imported, so a typo is refused before any heavy import)."""
    if name not in names(group):
        kind = _kind(group)
        known = ", ".join(names(group)) or "none"
        raise HarnessError(f"unknown {kind} {name!r}; registered {kind}s: {known} (see `harness list`)")


def get(group: str, name: str) -> Any:
    """The registered class, or a one-line HarnessError naming the alternatives."""
    kind = _kind(group)
    require(group, name)
    try:
        entry = _entry(group, name)
    except KeyError:  # pragma: no cover - listed a moment ago
        raise HarnessError(f"unknown {kind} {name!r} (see `harness list`)") from None
    if not entry.ok:
        raise HarnessError(
            f"{kind} {name!r} from package {entry.distribution!r} failed to load ({entry.error}); "
            f"fix or uninstall that plugin"
        )
    return entry.obj


def get_method(name: str):
    return get(METHODS, name)


def build_method(method: str, method_params: dict[str, Any] | None, seed: int):
    """The registered method `method`, built from its parameters (typed and validated; `seed`
    unless the parameters give one)."""
    from harness import params

    values = {**(method_params or {})}
    values.setdefault("seed", seed)
    return params.build(get_method(method), values, what=f"method {method}")


def get_suite(name: str):
    return get(SUITES, name)
