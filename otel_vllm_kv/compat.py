"""Decide whether the installed vLLM can be instrumented: every internal the package touches checks out.

The policy (docs/versions.md): the package declares no upper bound on vLLM; each process that
instruments checks the internals table (``internals``) on the installed release instead.

* Every internal checks out: instrumented, with one INFO line naming the release and the newest
  release the package was tested on (``TESTED_RELEASES``).
* Otherwise: one WARNING naming the release and each missing or changed internal; nothing is
  patched.

Both lines go to the logger ``otel_vllm_kv.versions``, which writes them to stderr itself (and
does not propagate): ``vllm serve`` sets the root logger and its handlers to ERROR, and vLLM
configures its own logger only after ``instrument()`` ran, so no other route shows an INFO line
everywhere. An application silences it as any logger (``setLevel``). The line is written once
per process tree: the first process that reports leaves ``OTEL_PYTHON_VLLM_KV_VERSION_REPORTED``
to the engine, worker and API-server processes it starts, which reach the same verdict silently.
"""

from __future__ import annotations

import logging
import os

from packaging.version import InvalidVersion, Version

from otel_vllm_kv import internals
from otel_vllm_kv.environment_variables import OTEL_PYTHON_VLLM_KV_VERSION_REPORTED

#: The releases the test suite ran on (docs/versions.md: at which level each).
TESTED_RELEASES = ("0.31.0", "0.32.0", "0.33.0", "0.34.0")
LOGGER_NAME = "otel_vllm_kv.versions"


def _verdict_logger() -> logging.Logger:
    """The verdict's logger, with a stderr handler of its own unless the application gave it one."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return logger


def vllm_version() -> str:
    try:
        from vllm import __version__
    except Exception:  # noqa: BLE001 - any failure means "unknown"
        return "unknown"
    return str(__version__)


def failures() -> list[internals.Finding]:
    """The required internals this vLLM lacks or has changed."""
    return [finding for finding in map(internals.check_installed, internals.required()) if not finding.ok]


def unsupported_reason() -> str | None:
    """Why this vLLM cannot be instrumented, or None if every required internal checks out."""
    found = failures()
    if not found:
        return None
    return f"vLLM {vllm_version()} lacks or changed " + "; ".join(map(str, found))


def supported() -> bool:
    """Check this vLLM and say so once per process tree: INFO if instrumented, else one WARNING."""
    reason = unsupported_reason()
    if not os.environ.get(OTEL_PYTHON_VLLM_KV_VERSION_REPORTED):
        os.environ[OTEL_PYTHON_VLLM_KV_VERSION_REPORTED] = str(os.getpid())
        if reason is None:
            _verdict_logger().info("%s", _instrumented_line(vllm_version()))
        else:
            warn_unsupported(reason)
    return reason is None


def warn_unsupported(reason: str) -> None:
    _verdict_logger().warning(
        "otel-vllm-kv does not recognise this vLLM (%s); KV-cache instrumentation is off, nothing is patched", reason
    )


def _instrumented_line(version: str) -> str:
    newest = TESTED_RELEASES[-1]
    line = f"otel-vllm-kv instruments vLLM {version}: every internal it uses checks out"
    try:
        untested = Version(version).release > Version(newest).release
    except InvalidVersion:
        untested = True
    if untested:
        return f"{line}, though vLLM {newest} is the newest release it was tested on"
    return f"{line} (tested on {TESTED_RELEASES[0]} to {newest})"
