"""Apply and undo patches: tables of wrapt class patches, and hooks on one object's own methods.

A class patch (``(module, "Class.method" or "function", wrapper)``) reaches every
instance, but wrapt binds it to the instance at every call. The engine's per-step hooks
shadow the one scheduler's (or pool's) own methods instead: no other object pays, and a
closure holds what the hook needs, so no call looks anything up.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.instrumentation.utils import unwrap
from wrapt import FunctionWrapper, wrap_function_wrapper


def apply_patches(patches: tuple) -> None:
    for module, name, wrapper in patches:
        wrap_function_wrapper(module, name, wrapper)


def remove_patches(patches: tuple) -> None:
    """Put back the original functions; a no-op for modules never imported or never patched."""
    for module, name, _ in patches:
        owner, _, attribute = name.rpartition(".")
        if owner:
            unwrap(f"{module}.{owner}", attribute)
        elif module in sys.modules:
            unwrap(sys.modules[module], attribute)


def hook_methods(
    target: object, hooks: dict[str, Callable[[Callable], Callable]], beneath: Iterable[Callable] = ()
) -> None:
    """Shadow ``target``'s own methods: ``hooks[name](original)`` returns what a call runs instead.

    ``original`` is the class's method bound to ``target``. Where that method is one of our own
    class patches whose wrapper is in ``beneath``, ``original`` is the function the patch wraps,
    so a call on this instance does not run that patch too; anyone else's class patch stays.

    Not wrapt, on purpose: these hooks run on the engine's hot path (every step, every block
    allocation), where a wrapt ``FunctionWrapper`` around a bound method costs several times
    what a closure with the method's own parameters costs (docs/benchmarks.md). A hook that
    names its parameters must take exactly
    the method's (``check_parameters``), so a vLLM whose signature moved fails here, at attach,
    where the probe gives up with a warning, never inside a call; ``*args, **kwargs`` takes any.
    """
    skipped = tuple(beneath)
    cls = type(target)
    for name, hook in hooks.items():
        method = inspect.getattr_static(cls, name)
        if isinstance(method, FunctionWrapper) and method._self_wrapper in skipped:
            method = method.__wrapped__
        original = method.__get__(target, cls)
        replacement = hook(original)
        check_parameters(replacement, original, f"{cls.__name__}.{name}")
        # setattr, never vars(target): reading an object's __dict__ makes CPython build it, and every
        # later attribute read of vLLM's own code on that object then takes the slow path.
        setattr(target, name, functools.update_wrapper(replacement, original))  # __wrapped__ marks it ours


def unhook_methods(target: object, names: Iterable[str]) -> None:
    """Undo ``hook_methods``: the class's method is ``target``'s again, nothing is left on it."""
    for name in names:
        current = getattr(target, name, None)
        # A plain function found on an instance is an instance attribute (a method would come
        # bound): ours if it carries __wrapped__.
        if isinstance(current, types.FunctionType) and hasattr(current, "__wrapped__"):
            delattr(target, name)


def parameters(function: Callable) -> tuple[tuple[str, Any, bool], ...] | None:
    """(name, kind, has a default) of each parameter; None for a function that takes anything."""
    signature = inspect.signature(function, follow_wrapped=False)
    kinds = {parameter.kind for parameter in signature.parameters.values()}
    if inspect.Parameter.VAR_POSITIONAL in kinds and inspect.Parameter.VAR_KEYWORD in kinds:
        return None
    return tuple(
        (parameter.name, parameter.kind, parameter.default is not inspect.Parameter.empty)
        for parameter in signature.parameters.values()
    )


def takes(method: Callable, names: tuple[str, ...]) -> bool:
    """Whether ``method`` (unbound: ``self`` first) has exactly these required parameters after ``self``."""
    own = parameters(method)
    if own is None:
        return False
    return tuple(name for name, _, _ in own[1:]) == names and not any(
        kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD or default for _, kind, default in own[1:]
    )


def check_parameters(hook: Callable, method: Callable, name: str) -> None:
    """Raise TypeError unless ``hook`` accepts every call ``method`` does (same parameters, or any)."""
    expected = parameters(hook)
    if expected is not None and expected != parameters(method):
        raise TypeError(f"vLLM's {name}{inspect.signature(method)} is not the {name}{inspect.signature(hook)} hooked")
