"""Apply and undo tables of wrapt wrappers: ``(module, "Class.method" or "function", wrapper)``."""

from __future__ import annotations

import sys

from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper


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
