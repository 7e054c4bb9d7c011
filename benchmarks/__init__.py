"""What otel-vllm-kv costs vLLM: one module per question, each run from the repository root as
``python -m benchmarks.<name>`` (benchmarks/README.md). Results: docs/benchmarks.md."""
