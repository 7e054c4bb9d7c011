"""Helpers of the test suite, imported as ``tests.support.<module>`` (pytest puts the repository's root on
``sys.path``; a script run in a subprocess gets it on ``PYTHONPATH``: ``instrumented_processes.support_pythonpath``).

The benchmarks share ``schedulers``, the harness of real vLLM schedulers without a model.
"""
