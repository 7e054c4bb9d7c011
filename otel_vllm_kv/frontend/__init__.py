"""Code that runs in vLLM's **frontend** processes: ``LLM``, ``AsyncLLM``, each API server.

A frontend submits requests and processes their outputs: it annotates the spans of the
requests it submitted with their admission records, reports engines that run no probe from
vLLM's scheduler statistics, and adds the token gauges to the ``/metrics`` it serves.
"""
