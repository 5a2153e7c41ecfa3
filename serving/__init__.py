"""looprl.serving: OpenAI-compatible embedded server with runtime LoRA hot-swap, and the adapter
controller that drives it and vLLM through the same HTTP API."""
