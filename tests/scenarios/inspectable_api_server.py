"""vLLM's OpenAI server plus one test-only route reporting this package's per-request state.

``GET /test/otel-vllm-kv`` answers the number of requests the frontend annotator still
tracks, and this process's RSS. Run it as vLLM's server module is run (same arguments).
"""

if __name__ == "__main__":
    import psutil
    from vllm.entrypoints.launchers.api_server import entry

    from otel_vllm_kv.frontend import spans

    build_app = entry.build_app

    def build_inspectable_app(*args, **kwargs):
        app = build_app(*args, **kwargs)

        @app.get("/test/otel-vllm-kv")
        def state() -> dict:
            return {
                "tracked_requests": len(spans.annotator.requests),
                "rss_bytes": psutil.Process().memory_info().rss,
            }

        return app

    entry.build_app = build_inspectable_app
    entry.main()
