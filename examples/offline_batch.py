"""A plain vLLM batch script with no OpenTelemetry code: run it under ``opentelemetry-instrument``.

    opentelemetry-instrument --metrics_exporter otlp --traces_exporter otlp \\
        python examples/offline_batch.py --model DIR

Without ``--model`` it builds the package's tiny test model in a temporary directory.
"""

from __future__ import annotations

import argparse
import tempfile


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory or name (default: build the tiny test model)")
    parser.add_argument("--requests", type=int, default=16, help="prompts in the batch (default 16)")
    parser.add_argument("--max-tokens", type=int, default=400, help="tokens generated per prompt (default 400)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from vllm import LLM, SamplingParams

    if args.model:
        llm = LLM(model=args.model)
    else:
        from otel_vllm_kv.demo.tiny_model import build_tiny_model, engine_kwargs

        model_dir = tempfile.mkdtemp(prefix="tiny-model-")
        build_tiny_model(model_dir)
        llm = LLM(**engine_kwargs(model_dir))
    prompts = [f"Prompt number {i}: " + "tell me more about caches. " * 10 for i in range(args.requests)]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, ignore_eos=True), use_tqdm=False)
    generated = sum(len(output.outputs[0].token_ids) for output in outputs)
    print(f"{len(outputs)} requests, {generated} tokens generated")


if __name__ == "__main__":  # vLLM on CPU starts its engine with spawn
    main()
