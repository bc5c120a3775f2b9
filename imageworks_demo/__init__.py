"""The ImageWorks demo backend: a CPU-only OpenAI-compatible server that really looks at images.

Not part of the product: nothing in ``imageworks_core`` or the dashboard imports it. The demo registry
(``configs/model_registry.curated.json``) launches it as a backend process, and the tests and benchmarks use it
as the process manager's peer (llama-swap's ``simple-responder``). It depends on the core, never the reverse.

- :mod:`imageworks_demo.server`: the HTTP server and its fault-injection switches (``python -m
  imageworks_demo.server``);
- :mod:`imageworks_demo.vision`: the image description it answers with (colours, shapes, digits);
- :mod:`imageworks_demo.launch`: the one place that says how to start it, for registry entries, tests and
  benchmarks.

This file stays empty of imports so the server starts (and answers ``/health``) fast.
"""
