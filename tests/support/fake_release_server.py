"""``vllm serve`` on a fake release (``fake_releases``), instrumented programmatically before it starts.

Usage, the repository's root on ``PYTHONPATH`` (``instrumented_processes.support_pythonpath``):
FAKE_VLLM_RELEASE=<fake>|none python tests/support/fake_release_server.py serve MODEL [vllm serve arguments]

Engine processes are spawned and re-import this module: the fake applies there too (named by
the inherited variable: vLLM rewrites ``sys.argv``), so every process of the tree runs the same
faked vLLM; only the main process calls ``instrument()``.
"""

import os
import sys

from tests.support.fake_releases import FAKES, Permanent

FAKE = os.environ.get("FAKE_VLLM_RELEASE", "none")
if FAKE != "none":
    FAKES[FAKE](Permanent())

if __name__ == "__main__":
    from otel_vllm_kv import VLLMKVCacheInstrumentor

    VLLMKVCacheInstrumentor().instrument()
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]
    sys.exit(main())
