"""Apply and undo wrapt wrappers: tables of class patches, and one object's own methods.

A class patch (``(module, "Class.method" or "function", wrapper)``) reaches every
instance, but wrapt binds it to the instance at every call. The engine's per-step hooks
wrap the one scheduler's (or pool's) own methods instead: no other object pays, the
wrapper is bound once, and a closure holds what the hook needs, so no call looks anything up.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterable

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


def wrap_methods(target: object, wrappers: dict[str, Callable], beneath: Iterable[Callable] = ()) -> None:
    """Wrap ``target``'s own bound methods (an instance attribute shadows the class's method).

    Where the class's method is one of our own class patches whose wrapper is in ``beneath``,
    the instance's wrapper goes around the function that patch wraps, so a call on this
    instance does not run that patch too. Anyone else's class patch stays in the chain.
    """
    skipped = tuple(beneath)
    cls = type(target)
    for name, wrapper in wrappers.items():
        method = inspect.getattr_static(cls, name)
        if isinstance(method, FunctionWrapper) and method._self_wrapper in skipped:
            method = method.__wrapped__
        setattr(target, name, FunctionWrapper(method.__get__(target, cls), wrapper))


def unwrap_methods(target: object, names: Iterable[str]) -> None:
    """Undo ``wrap_methods``: the class's method is ``target``'s again, nothing is left on it."""
    attributes = vars(target)
    for name in names:
        if hasattr(attributes.get(name), "__wrapped__"):  # only our wrappers live on the instance
            unwrap(target, name)
            attributes.pop(name, None)  # unwrap leaves the bound method on the instance
