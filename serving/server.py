"""Assemble and run the embedded server: base model -> Engine -> ServingService -> FastAPI -> uvicorn.

``build_service(cfg)`` loads the base (``cfg.serving.base_path`` or the workspace base) and starts
the engine thread; ``ServerThread`` runs uvicorn in a background thread (tests, benchmarks, the
demo); ``serve(cfg)`` runs it in the foreground for ``looprl serving serve``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import torch

from looprl.ingest.broker import bootstrap_servers
from looprl.ingest.client import ResponseLogger
from looprl.kernels import triton_available, triton_installed
from looprl.ops.core.config import ConfigError, LooprlConfig
from looprl.ops.core.listen import HttpThread, run_http
from looprl.ops.core.log import get_logger
from looprl.policy.model import base_checksum, check_memory, load_base, model_device, resolve_placement, stop_token_ids
from looprl.serving.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_PROMPT_CHARS, create_app
from looprl.serving.compare import Comparer, comparer_from_config
from looprl.serving.engine import Engine
from looprl.serving.service import ServingService

log = get_logger(__name__)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token_of(cfg: LooprlConfig) -> str | None:
    """The admin token; refuses to expose unauthenticated admin endpoints beyond loopback."""
    tok = cfg.serving.admin_token.get_secret_value() if cfg.serving.admin_token else None
    if tok is None and not _is_loopback(cfg.serving.host):
        raise ConfigError(
            f"config key 'serving.admin_token' must be set when serving.host={cfg.serving.host!r} is not loopback "
            "(the adapter admin endpoints would be open)"
        )
    return tok


def serving_base_path(cfg: LooprlConfig) -> Path:
    return cfg.serving.base_path or cfg.base_path


def serving_moe_lora(setting: str, device: torch.device) -> str:
    """``serving.moe_lora`` for a model on ``device``: "auto" is the Triton kernel on CUDA when
    triton is installed, else the torch fused path (mixed-adapter batches on every device)."""
    if setting != "auto":
        return setting
    return "triton" if device.type == "cuda" and triton_installed() else "torch"


def build_service(cfg: LooprlConfig, model: Any = None, tokenizer: Any = None) -> ServingService:
    """Load the base model (unless given), start an engine on it, wrap it in a service."""
    torch.set_num_threads(cfg.serving.torch_threads)
    if cfg.serving.moe_lora == "triton" and not triton_available():
        raise ConfigError("config key 'serving.moe_lora' is 'triton' but triton or CUDA is missing")
    path = serving_base_path(cfg)
    if model is None or tokenizer is None:
        placement = resolve_placement(cfg.model)
        check_memory(cfg, "serving", placement)  # before loading: weights + adapters + KV cache must fit
        model, tokenizer = load_base(path, device=placement.device, dtype=placement.dtype)
    checksum = base_checksum(path) if (Path(path) / "config.json").is_file() else None
    s = cfg.serving
    engine = Engine(model, tokenizer, max_batch_size=s.max_batch_size, max_queue=s.max_queue,
                    max_lora_rank=s.max_lora_rank, max_loras=s.max_loras, base_checksum=checksum,
                    moe_lora=serving_moe_lora(s.moe_lora, model_device(model)), unhealthy_after=s.unhealthy_after,
                    max_context=s.max_context_tokens,
                    stop_ids=stop_token_ids(tokenizer, model, cfg.model.stop_tokens)).start()
    log.info("engine started", base=str(path), checksum=(checksum or "")[:12], max_batch_size=s.max_batch_size)
    return ServingService(engine, registry_root=cfg.registry_dir, base_name=s.served_model_name, alias=s.alias,
                          base_path=Path(path))


def make_response_logger(cfg: LooprlConfig) -> Any:
    """A ``ResponseLogger`` on the responses topic, or None (with a warning) when Kafka is not
    configured or not reachable: serving never depends on the log being up. It connects as the
    responses principal (``kafka.responses_username``, else ``kafka.sasl_username``): the one an
    ACL lets write the responses topic."""
    if not cfg.serving.log_responses:
        return None
    try:
        servers = cfg.kafka.bootstrap_servers
        if servers is None:
            servers = bootstrap_servers(cfg)
        return ResponseLogger(servers, topic=cfg.kafka.topic_responses, client=cfg.kafka.client,
                              security=cfg.kafka.security("responses"))
    except Exception as e:
        log.warning("responses will not be logged (no Kafka)", error=str(e)[:300])
        return None


class ServerThread(HttpThread):
    """The embedded server's app in a daemon thread, on a fixed or free port; ``stop()`` shuts it
    down cleanly and stops the engine."""

    def __init__(self, service: ServingService, *, host: str = "127.0.0.1", port: int = 0,
                 admin_token: str | None = None, response_logger: Any = None, default_max_tokens: int = 32,
                 render_prompts: bool = True, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS, comparer: Comparer | None = None,
                 compare: str = "never", compare_across_canary: bool = True):
        self.service = service
        self.app = create_app(service, admin_token=admin_token, response_logger=response_logger,
                              default_max_tokens=default_max_tokens, render_prompts=render_prompts,
                              max_body_bytes=max_body_bytes, max_prompt_chars=max_prompt_chars,
                              comparer=comparer, compare=compare, compare_across_canary=compare_across_canary)

        def stop() -> None:
            service.engine.stop()
            if comparer is not None:
                comparer.stop()

        super().__init__(self.app, host, port, name="looprl-serve", lifespan="off", on_stop=stop)


def serve(cfg: LooprlConfig, host: str | None = None, port: int | None = None) -> int:
    """Foreground server for ``looprl serving serve`` (Ctrl-C to stop)."""
    token = admin_token_of(cfg.model_copy(update={"serving": cfg.serving.model_copy(
        update={"host": host or cfg.serving.host})}))
    if token is None:
        log.warning("serving.admin_token is not set: admin endpoints are open on loopback only")
    service = build_service(cfg)
    logger = make_response_logger(cfg)
    # Loads the reward model only once a request asks for a comparison (looprl_compare / serving.compare).
    comparer = comparer_from_config(cfg)
    app = create_app(service, admin_token=token, response_logger=logger,
                     default_max_tokens=cfg.serving.default_max_tokens, render_prompts=cfg.serving.render_prompts,
                     max_body_bytes=cfg.serving.max_body_bytes, max_prompt_chars=cfg.serving.max_prompt_chars,
                     comparer=comparer, compare=cfg.serving.compare,
                     compare_across_canary=cfg.serving.compare_across_canary)
    h, p = host or cfg.serving.host, cfg.serving.port if port is None else port
    try:
        # port 0: a free port, logged ("serving listening", url and port)
        run_http(app, h, p, what="serving", key="serving.port (or --port)", alias=cfg.serving.alias,
                 base_name=cfg.serving.served_model_name)
    finally:
        service.engine.stop()
        comparer.stop()
        if app.state.response_logger is not None:  # the ResponseRecorder around `logger`
            app.state.response_logger.close()
    return 0
