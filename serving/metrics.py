"""Prometheus metrics of the serving tier (served on the server's own port at /metrics).

Labels are bounded: endpoint is one of a few route names, status an HTTP status code, role
``primary``/``canary``, reason a short refusal label. Versions are gauge *values*, never labels.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

REQUESTS = Counter("looprl_serving_requests_total", "HTTP requests answered", ["endpoint", "status"])
ERRORS = Counter("looprl_serving_request_errors_total", "Requests answered with an error", ["endpoint", "reason"])
LATENCY = Histogram("looprl_serving_request_seconds", "End-to-end request latency", ["endpoint"], buckets=LATENCY_BUCKETS)
TTFT = Histogram("looprl_serving_time_to_first_token_seconds", "Submit to first generated token", buckets=LATENCY_BUCKETS)
TOKENS = Counter("looprl_serving_generated_tokens_total", "Generated tokens (rate() gives tokens/s)")
TOKENS_PER_SECOND = Gauge("looprl_serving_generated_tokens_per_second", "Generated tokens/s over the last few seconds")
BATCH_SIZE = Histogram(
    "looprl_serving_batch_size", "Sequences decoded per engine step (all adapters)",
    buckets=(1, 2, 4, 8, 12, 16, 24, 32, 64),
)
RUNNING = Gauge("looprl_serving_running_sequences", "Sequences being decoded")
WAITING = Gauge("looprl_serving_waiting_requests", "Requests queued for admission")
LOADED_ADAPTERS = Gauge("looprl_serving_loaded_adapters", "LoRA adapters loaded (including draining ones)")
ACTIVE_VERSION = Gauge(
    "looprl_serving_active_version", "Registry version number an alias routes to (0 = base model)", ["alias", "role"]
)
CANARY_SHARE = Gauge("looprl_serving_canary_share", "Traffic share routed to the canary", ["alias"])
SWAPS = Counter("looprl_serving_adapter_swaps_total", "Alias flips to a different adapter")
ADAPTER_LOADS = Counter("looprl_serving_adapter_loads_total", "Adapters loaded")
ADAPTER_UNLOADS = Counter("looprl_serving_adapter_unloads_total", "Adapters unloaded")
LOAD_FAILURES = Counter("looprl_serving_adapter_load_failures_total", "Adapter loads refused or failed", ["reason"])
REQUESTS_FAILED = Counter(
    "looprl_serving_requests_failed_total", "Generation requests that failed (adapter: public name or base)",
    ["adapter", "reason"],
)
RESPONSE_LOG_FAILURES = Counter("looprl_serving_response_log_failures_total", "Responses that could not be logged")
COMPARISONS = Counter(
    "looprl_serving_comparisons_total",
    "Comparisons considered for looprl_compare=auto requests, by outcome (asked, confident, "
    "over_budget, no_reward_model, no_ensemble, identical, failed), and answered for looprl_compare=always "
    "requests (requested)", ["outcome"],
)
