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
- ``gateway``: the OpenAI-compatible proxy in front of vLLM or embedded servers (``looprl
  gateway``): routing from the controller's routing file, attribution, response logging;
- ``attribution``: what every answer carries and the ``ResponseEvent`` it leaves (embedded server
  and gateway alike), with the never-blocking, bounded ``ResponseRecorder``;
- ``testing``: tiny base / adapter builders for tests and benchmarks.
"""
