"""The tiny model on a real vLLM engine, started quietly and always shut down."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from otel_vllm_kv.demo.tiny_model import build_tiny_model, engine_kwargs

if TYPE_CHECKING:
    from vllm import LLM

#: vLLM settings the demo picks unless the environment already sets them (engine processes inherit them).
VLLM_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "ERROR"}


def apply_vllm_defaults() -> None:
    """Set :data:`VLLM_DEFAULTS` where unset; call before vLLM is imported (instrumenting imports it)."""
    for name, value in VLLM_DEFAULTS.items():
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def _model_directory(model_dir: Path | None) -> Iterator[Path]:
    if model_dir is not None:
        yield build_tiny_model(model_dir)
        return
    with tempfile.TemporaryDirectory(prefix="otel-vllm-kv-tiny-") as directory:
        yield build_tiny_model(directory)


@contextlib.contextmanager
def tiny_engine(model_dir: Path | None = None) -> Iterator[LLM]:
    """An ``LLM`` on the tiny model (engine core in a spawned process); shut down on exit."""
    with _model_directory(model_dir) as directory:
        from vllm import LLM

        llm = LLM(**engine_kwargs(directory))
        try:
            yield llm
        finally:
            llm.llm_engine.engine_core.shutdown()
