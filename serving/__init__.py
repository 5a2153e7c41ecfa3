"""looprl.serving: OpenAI-compatible embedded server with runtime LoRA hot-swap, and the adapter
controller that drives it and vLLM through the same HTTP API (see serving/README.md).

Modules, from the model outwards:
- ``engine``: model + adapters + scheduler thread (continuous batching, KV cache in ``kv``,
  mixed-adapter forwards in ``mixed``, sampling in ``sampling``);
- ``adapters``: which LoRA adapters may be loaded (registry-only, checksums, compatibility);
- ``routing``: aliases and the sticky weighted canary split;
- ``service``: names -> adapters, atomic alias flips, adapter admin;
- ``app`` / ``protocol``: the FastAPI HTTP layer and its request bodies; ``server``: assembly,
  ``looprl serving serve``; ``metrics``: Prometheus metrics;
- ``controller``: applies registry pointers ``promoted``/``canary`` to endpoints
  (``looprl serving control``);
- ``testing``: tiny base / adapter builders for tests and benchmarks.
"""
