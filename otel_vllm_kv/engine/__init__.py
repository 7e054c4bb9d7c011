"""Code that runs in vLLM's **engine** processes (the engine core, where the scheduler lives).

The probe wraps the V1 scheduler and its block pool, publishes each engine's pool into the
relay and records admissions on the requests' ``trace_headers``. It exports nothing and
never raises into vLLM. The three roles: docs/architecture.md.
"""

from otel_vllm_kv.engine.probe import install, uninstall

__all__ = ["install", "uninstall"]
