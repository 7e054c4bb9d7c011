"""Code that runs in the **exporter**: the one process per process tree that exports the KV gauges.

It is the process ``opentelemetry-instrument`` started, or the one that called
``instrument()`` first (``roles``); its observable gauges read the relay at collection time.
"""
