"""How the package logs: its few warnings, each once, and never dropped by a foreign root level."""

from __future__ import annotations

import logging

_PACKAGE = "otel_vllm_kv"


def keep_warnings_visible() -> None:
    """Give the package's logger the WARNING level unless the application set one.

    ``vllm serve`` imports ``model_hosting_container_standards``, which sets the root logger to
    ERROR (unless ``LOG_LEVEL`` says otherwise); loggers that inherit the root's level would
    then drop the few warnings this package logs (an engine without a probe, a probe that
    gives up), which operators need to see.
    """
    package_logger = logging.getLogger(_PACKAGE)
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.WARNING)


class WarnOnce:
    """Log ``message``, with the exception being handled, the first time it is called only."""

    __slots__ = ("_logger", "_message", "warned")

    def __init__(self, logger: logging.Logger, message: str) -> None:
        self._logger = logger
        self._message = message
        self.warned = False

    def __call__(self) -> None:
        if not self.warned:
            self.warned = True
            self._logger.warning(self._message, exc_info=True)
