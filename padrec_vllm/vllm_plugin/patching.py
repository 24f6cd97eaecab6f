"""How the plugin wraps vLLM internals: resolve a symbol, check its signature, wrap it once.

Every patched symbol is a ``(module, class, attribute)`` triple listed by the module that hooks it
(``step.py``: the draft step; ``structured.py``: the list constraint; ``draft_constraint.py``: the
masked drafter; ``shm_notify.py``: the message queues' notifications). ``install_hook`` fails
with ``PatchError`` naming the symbol when vLLM lacks it or its leading parameters changed, so a
vLLM upgrade breaks loudly at start-up instead of silently skipping a hook. ``install_method``
adds a method vLLM does not have (``schedule_switch.py``: an engine-core utility) and fails the
same way when the class is missing or already has the name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

HOOK_MARK = "_padrec_hook"
Symbol = tuple[str, str, str]


class PatchError(RuntimeError):
    """A vLLM symbol that the PAD-Rec plugin patches is missing or changed."""


def symbol_name(symbol: Symbol) -> str:
    module, cls, attr = symbol
    return f"{module}.{cls}.{attr}"


def resolve(symbol: Symbol) -> tuple[type, Callable]:
    """(class, current attribute) of ``symbol``; PatchError when vLLM lacks either."""
    module, cls_name, attr = symbol
    try:
        cls = getattr(importlib.import_module(module), cls_name)
        fn = getattr(cls, attr)
    except (ImportError, AttributeError) as exc:
        raise PatchError(f"PAD-Rec vLLM plugin: {symbol_name(symbol)} not found ({exc}); "
                         "this plugin targets vLLM 0.32.0") from exc
    return cls, fn


def install_hook(symbol: Symbol, make_hook: Callable, params: tuple[str, ...]) -> None:
    """Replace ``symbol`` by ``make_hook(original)`` unless already done; ``params`` are the
    leading parameter names the hook relies on (PatchError when they differ)."""
    cls, fn = resolve(symbol)
    if getattr(fn, HOOK_MARK, False):
        return
    names = tuple(inspect.signature(fn).parameters)
    if names[: len(params)] != params:
        raise PatchError(f"PAD-Rec vLLM plugin: {symbol_name(symbol)} has parameters {names}, "
                         f"expected {params}; this plugin targets vLLM 0.32.0")
    hook = make_hook(fn)
    setattr(hook, HOOK_MARK, True)
    setattr(cls, symbol[2], hook)


def install_method(owner: tuple[str, str], name: str, fn: Callable) -> None:
    """Add ``fn`` as method ``name`` of class ``owner`` = ``(module, class)`` unless already
    done; PatchError when vLLM's class lacks or already has an attribute of that name (a vLLM
    that grew its own would be shadowed silently otherwise)."""
    module, cls_name = owner
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError) as exc:
        raise PatchError(f"PAD-Rec vLLM plugin: {module}.{cls_name} not found ({exc}); "
                         "this plugin targets vLLM 0.32.0") from exc
    current = getattr(cls, name, None)
    if current is not None and getattr(current, HOOK_MARK, False):
        return
    if current is not None:
        raise PatchError(f"PAD-Rec vLLM plugin: {module}.{cls_name}.{name} exists in this vLLM; "
                         "this plugin targets vLLM 0.32.0")
    setattr(fn, HOOK_MARK, True)
    setattr(cls, name, fn)
