"""The inference engine: one model, many LoRA adapters, one scheduler thread.

Requests are submitted from any thread and stream their output back through a callback. The
scheduler thread runs *continuous batching*:

    loop:
        admit waiting requests (up to max_batch_size running): prefill them, batched per adapter,
            and merge them into the running cohort of their adapter
        one decode step per cohort (all rows of a cohort share an adapter and a KV cache)
        drop finished rows; delete unloaded adapters whose last request finished

New requests therefore join at step boundaries instead of waiting for a batch to drain.
Rows on different adapters (promoted, canary, the previous version finishing after a swap, the
base model) share one batch and one forward (``mixed.MixedLora``: peft's ``adapter_names`` for
ordinary LoRA layers, a per-adapter pass of the fused MoE-LoRA kernel for LoRA on the experts).
With ``mixed=False`` the engine instead keeps one cohort per adapter and runs one plain peft
forward per adapter per step (the reference behaviour, kept for models the mixed path does not
cover).

Adapters are peft LoRA directories loaded through peft's own API (``PeftModel`` and its
``LoraModel``: load, select, disable, delete) under an internal key; the public name maps to that
key. Unloading hides the name at once, while requests already running on it finish on it
("draining"); the weights are deleted after the last one. So an alias flip never changes the
adapter of a request in flight.

Faults stay with the adapter that caused them. When a forward over rows of several adapters
raises, the engine retries each adapter's rows on their own (prefill), or probes each adapter
and repeats the step without the failing ones (decode, after cutting the KV cache back). Only
the requests of the failing adapter get an error; base traffic and other adapters keep being
served. Each adapter (and the base model) counts its failures; ``unhealthy_after`` consecutive
ones mark it unhealthy, which ``/health`` and the controller see.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import DynamicCache

from looprl.ops.core.log import get_logger
from looprl.ops.core.version import BASE_TEXT as BASE_VERSION  # what the base model's answers report as version
from looprl.policy.model import stop_token_ids
from looprl.serving import metrics as m
from looprl.serving.adapters import WEIGHTS_FILE, AdapterError, AdapterSpec, BaseInventory
from looprl.serving.detokenizer import IncrementalDetokenizer
from looprl.serving.kv import KVBatch, left_pad
from looprl.serving.mixed import BASE, MixedLora
from looprl.serving.sampling import RowSampler, SamplingParams, sample_next, token_logprobs

log = get_logger(__name__)

DEFAULT_UNHEALTHY_AFTER = 3


class EngineError(RuntimeError):
    """A request the engine cannot accept. ``reason`` is a bounded label; the HTTP layer maps it
    to a status (``looprl.serving.app.http_status``)."""

    def __init__(self, message: str, reason: str = "bad_request"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    completion_tokens: int
    adapter: str | None  # public adapter name, None = base model
    version: str  # registry version ("v3") or "base"
    error: str | None = None
    fault: str | None = None  # why it failed: "forward_error" | "engine_error" | "shutdown"
    token_ids: tuple[int, ...] = ()  # the completion's sampled tokens, ending with stop_token when one ended it
    # Per token of token_ids: its raw log-prob (``sampling.token_logprobs``: log_softmax of the
    # model's logits at temperature 1, before bias, penalties, top-k/top-p), always computed.
    logprobs: tuple[float, ...] = ()
    # Per token of token_ids: its params.top_logprobs most likely alternatives (id, raw log-prob),
    # most likely first; None when the request asked for none.
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    # The stop token that ended the answer (end of turn or eos; token_ids' last) and its raw log-prob.
    stop_token: int | None = None
    stop_logprob: float | None = None


class Delta(str):
    """A piece of streamed text (a ``str``), with the tokens generated since the previous piece:
    ``token_ids``, their raw ``logprobs`` and (if asked) ``top_logprobs``. A token whose text is
    held back (an incomplete character, a possible stop string) comes with a later piece; tokens
    still unsent at the end are the tail of ``Finished.token_ids``."""

    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None


# Events sent to a request's sink: ("delta", Delta) zero or more times, then ("done", Finished).
Sink = Callable[[tuple[str, Any]], None]


@dataclass
class Health:
    """Request outcomes of one adapter (or the base model)."""

    unhealthy_after: int
    served: int = 0
    failed: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures < self.unhealthy_after

    def record(self, error: str | None) -> None:
        if error is None:
            self.served += 1
            self.consecutive_failures = 0
        else:
            self.failed += 1
            self.consecutive_failures += 1
            self.last_error = error[:300]

    def public(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "served": self.served, "failed": self.failed,
                "consecutive_failures": self.consecutive_failures, "last_error": self.last_error}


@dataclass
class AdapterInfo:
    name: str
    key: str  # peft adapter name inside the model
    version: str
    path: Path
    rank: int
    loaded_at: float
    target_parameters: tuple[str, ...] = ()
    in_flight: int = 0
    draining: bool = False
    health: Health = field(default_factory=lambda: Health(DEFAULT_UNHEALTHY_AFTER))

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "path": str(self.path), "rank": self.rank,
            "loaded_at": self.loaded_at, "in_flight": self.in_flight, "draining": self.draining,
            "health": self.health.public(),
        }


@dataclass
class _Request:
    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterInfo | None
    sink: Sink
    submitted: float = field(default_factory=time.perf_counter)
    sampler: RowSampler | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # raw log-prob of each generated token
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)  # if params.top_logprobs
    stop_token: int | None = None
    stop_logprob: float | None = None
    stop_top: tuple[tuple[int, float], ...] = ()
    streamed_tokens: int = 0  # tokens already sent with a Delta
    detokenizer: IncrementalDetokenizer = field(default_factory=IncrementalDetokenizer)
    pending: str = ""  # decoded text not sent yet: it may be the start of a stop string
    emitted: int = 0  # characters of text already sent
    cancelled: bool = False
    done: bool = False

    @property
    def key(self) -> str | None:
        return self.adapter.key if self.adapter else None


class Handle:
    """What ``submit`` returns: lets the caller cancel (e.g. when the client disconnects)."""

    def __init__(self, req: _Request, engine: "Engine"):
        self._req, self._engine = req, engine

    @property
    def version(self) -> str:
        """The version that will produce this answer (fixed at submit, whatever happens to aliases)."""
        return self._req.adapter.version if self._req.adapter else BASE_VERSION

    def cancel(self) -> None:
        self._req.cancelled = True
        self._engine._wake()


class _Cohort:
    """Running rows that share one adapter and one batched KV cache."""

    def __init__(self, key: str | None):
        self.key = key
        self.rows: list[_Request] = []
        self.kv: KVBatch | None = None


class Engine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_lora_rank: int = 64,
        max_loras: int = 4,
        base_checksum: str | None = None,
        seed: int = 0,
        mixed: bool = True,
        moe_lora: str = "torch",
        unhealthy_after: int = DEFAULT_UNHEALTHY_AFTER,
        stop_ids: list[int] | None = None,
        max_context: int | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("tokenizer needs pad_token and eos_token set")
        self.pad_id = int(tokenizer.pad_token_id)
        # The chat template's end of turn and every eos (looprl.policy.model.stop_token_ids).
        self.stop_ids = set(stop_ids) if stop_ids else set(stop_token_ids(tokenizer, model))
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        # Longest prompt + answer (serving.max_context_tokens, at most the model's positions): bounds
        # the KV cache, which lives on the model's device in its dtype (the model writes it).
        self.max_context = int(getattr(model.config, "max_position_embeddings", 2048))
        if max_context is not None:
            self.max_context = min(self.max_context, int(max_context))
        self.unhealthy_after = unhealthy_after
        self.base_health = Health(unhealthy_after)
        # Inputs follow the model; sampling runs on the CPU (B x V logits, per-request generators).
        self.device = next(model.parameters()).device
        self.inventory = BaseInventory.of(model, base_checksum)
        # Width of the logits: the token ids a logit_bias may name.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
        self._gen = torch.Generator().manual_seed(seed)
        self._ids = itertools.count(1)
        self._keys = itertools.count(1)

        self._lock = threading.Lock()  # adapter table, waiting queue
        self._model_lock = threading.Lock()  # held for every forward and every adapter injection
        self._cv = threading.Condition(self._lock)
        self._waiting: list[_Request] = []
        self._adapters: dict[str, AdapterInfo] = {}  # public name -> info (not draining)
        self._draining: list[AdapterInfo] = []
        self._peft: PeftModel | None = None  # wraps self.model while any adapter is injected
        self._mixer = MixedLora(self.model, impl=moe_lora) if mixed else None
        self._cohorts: dict[str | None, _Cohort] = {}
        self._active: tuple[bool, str | None] | None = None  # (adapters enabled, key) last set
        self._thread: threading.Thread | None = None
        self._stop = False
        self._tok_window: list[tuple[float, int]] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="looprl-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            pending, self._waiting = self._waiting, []
        for cohort in self._cohorts.values():
            pending.extend(cohort.rows)
        self._cohorts.clear()
        for req in pending:
            self._finish(req, "error", error="server shutting down", fault="shutdown")

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # ------------------------------------------------------------------ requests
    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None, sink: Sink) -> Handle:
        """Queue a generation. ``adapter``: public adapter name, or None for the base model."""
        return self.submit_many(prompt_ids, [params], adapter, [sink])[0]

    def submit_many(self, prompt_ids: list[int], params: list[SamplingParams], adapter: str | None,
                    sinks: list[Sink]) -> list[Handle]:
        """Queue one generation per ``params`` of the same prompt on the same adapter (the choices of
        an n > 1 request), each streaming to its sink: all of them, or none (an error is raised)."""
        if len(params) != len(sinks) or not params:
            raise ValueError("submit_many needs one sink per SamplingParams, and at least one")
        if not prompt_ids:
            raise EngineError("prompt is empty", reason="empty_prompt")
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise EngineError(
                f"prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context}",
                reason="prompt_too_long",
            )
        # as OpenAI does: an answer cut to the room left ends with finish_reason "length"
        params = [dataclasses.replace(p, max_tokens=room) if p.max_tokens > room else p for p in params]
        with self._cv:
            if self._stop or self._thread is None:
                m.REQUESTS_FAILED.labels(adapter=adapter or BASE_VERSION, reason="not_running").inc()
                raise EngineError("engine is not running", reason="not_running")
            if len(self._waiting) + len(params) > self.max_queue:
                m.REQUESTS_FAILED.labels(adapter=adapter or BASE_VERSION, reason="overloaded").inc()
                raise EngineError("server is overloaded, retry later", reason="overloaded")
            info = None
            if adapter is not None:
                info = self._adapters.get(adapter)
                if info is None:
                    raise EngineError(f"adapter {adapter!r} is not loaded", reason="unknown_model")
                info.in_flight += len(params)
            queued = False
            try:
                # Creating a sampler can raise (e.g. torch refuses the seed): the count must then
                # go back down, or an unloaded adapter stays draining forever.
                reqs = [_Request(next(self._ids), list(prompt_ids), p, info, sink, sampler=RowSampler.create(p))
                        for p, sink in zip(params, sinks)]
                self._waiting.extend(reqs)
                queued = True
            finally:
                if info is not None and not queued:
                    info.in_flight -= len(params)
            m.WAITING.set(len(self._waiting))
            self._cv.notify_all()
        return [Handle(req, self) for req in reqs]

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                 adapter: str | None = None, timeout: float = 120.0) -> Finished:
        """Blocking convenience for scripts and tests."""
        ids = self.encode(prompt) if isinstance(prompt, str) else prompt
        box: queue.Queue = queue.Queue()
        self.submit(ids, params or SamplingParams(), adapter, box.put)
        deadline = time.monotonic() + timeout
        while True:
            kind, payload = box.get(timeout=max(0.0, deadline - time.monotonic()))
            if kind == "done":
                return payload

    # ------------------------------------------------------------------ adapters
    def resolve(self, name: str) -> AdapterInfo | None:
        with self._lock:
            return self._adapters.get(name)

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return list(self._adapters.values())

    def draining(self) -> list[AdapterInfo]:
        with self._lock:
            return list(self._draining)

    def load_adapter(self, spec: AdapterSpec) -> AdapterInfo:
        """Inject a validated adapter under ``spec.name``. Raises ``AdapterError`` and leaves the
        model as it was if the weights do not fit."""
        with self._lock:
            if spec.name in self._adapters:
                raise AdapterError(f"lora_name {spec.name!r} is already loaded; unload it first or use a new name",
                                   reason="exists")
            if len(self._adapters) >= self.max_loras:
                raise AdapterError(
                    f"{len(self._adapters)} adapters are loaded = serving.max_loras; unload one first",
                    reason="too_many",
                )
            loaded = list(self._adapters.values()) + self._draining
        # peft keeps one set of expert-parameter wrappers for all adapters on a model.
        for other in loaded:
            if other.target_parameters and spec.target_parameters and set(other.target_parameters) != set(spec.target_parameters):
                raise AdapterError(
                    f"target_parameters {list(spec.target_parameters)} differ from those of loaded adapter "
                    f"{other.name!r} {list(other.target_parameters)}; peft serves one set per model",
                    reason="incompatible",
                )
        weights_path = spec.path / WEIGHTS_FILE
        try:
            state = load_file(str(weights_path))
        except Exception as e:  # corrupt header, truncated file, ...
            raise AdapterError(f"{weights_path}: unreadable safetensors: {e}", reason="bad_file") from None
        for k, t in state.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise AdapterError(f"{weights_path}: tensor {k} is not finite floating point", reason="bad_weights")
        key = f"lora{next(self._keys)}"
        t0 = time.perf_counter()
        with self._model_lock:
            try:
                self._inject(spec.path, key)
                self._check_loaded(key, state, weights_path)
                if self._mixer is not None:
                    self._mixer.refresh()
            except Exception as e:
                self._delete_key(key)
                if isinstance(e, AdapterError):
                    raise
                raise AdapterError(f"{spec.path}: adapter does not fit the base model: {str(e)[:500]}",
                                   reason="incompatible") from None
            finally:
                self._active = None
        info = AdapterInfo(spec.name, key, spec.version, spec.path, spec.rank, time.time(), spec.target_parameters,
                           health=Health(self.unhealthy_after))
        with self._lock:
            self._adapters[spec.name] = info
            m.LOADED_ADAPTERS.set(len(self._adapters) + len(self._draining))
        m.ADAPTER_LOADS.inc()
        log.info("adapter loaded", name=spec.name, version=spec.version, rank=spec.rank,
                 seconds=round(time.perf_counter() - t0, 4))
        return info

    def _inject(self, path: Path, key: str) -> None:
        """Add the LoRA layers of ``path`` to the model under ``key``. Caller holds the model lock."""
        with warnings.catch_warnings():  # peft warns that a model holds several adapters: intended
            warnings.simplefilter("ignore")
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, str(path), adapter_name=key, is_trainable=False)
            else:
                self._peft.load_adapter(str(path), adapter_name=key, is_trainable=False)

    def _check_loaded(self, key: str, state: dict[str, torch.Tensor], where: Path) -> None:
        """Every LoRA tensor of the new adapter must come from the file: transformers reports
        missing keys instead of raising, and a randomly initialised LoRA would serve garbage."""
        params = {n: p for n, p in self.model.named_parameters() if f".{key}." in n}
        if not params:
            raise AdapterError(f"{where}: no LoRA weights were injected", reason="incompatible")
        by_name = {}
        for k, t in state.items():
            name = k.removeprefix("base_model.model.")
            head, _, tail = name.rpartition(".")
            by_name[f"{head}.{key}.{tail}"] = t
        for n, p in params.items():
            t = by_name.get(n)
            if t is None:
                raise AdapterError(f"{where}: no tensor for {n.replace('.' + key, '')} in the file", reason="bad_weights")
            if tuple(t.shape) != tuple(p.shape) or not torch.equal(t.to(p.dtype), p.detach()):
                raise AdapterError(f"{where}: tensor for {n.replace('.' + key, '')} does not fit the base", reason="bad_weights")
        extra = set(by_name) - set(params)
        if extra:
            raise AdapterError(f"{where}: {len(extra)} tensors target nothing in the base, e.g. {sorted(extra)[0]}",
                               reason="bad_weights")

    def _delete_key(self, key: str) -> None:
        """Remove ``key``'s LoRA layers; with the last adapter gone, the bare base model is restored
        (peft cannot add an adapter to a ``PeftModel`` whose adapters were all deleted)."""
        if self._peft is None:
            return
        try:
            with warnings.catch_warnings():  # "adapter was active which is now deleted": intended
                warnings.simplefilter("ignore")
                if key in self._peft.peft_config:
                    self._peft.delete_adapter(key)
                if not self._peft.peft_config:
                    self._peft.unload()
                    self._peft = None
                elif self._peft.active_adapter not in self._peft.peft_config:
                    # peft reads its config through the active name (load_adapter needs it valid).
                    self._peft.set_adapter(next(iter(self._peft.peft_config)), inference_mode=True)
                    self._active = None
        except Exception as e:  # pragma: no cover - best effort cleanup
            log.warning("adapter cleanup failed", key=key, error=str(e))

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Hide ``name`` now; delete its weights once its in-flight requests finish."""
        with self._cv:
            info = self._adapters.pop(name, None)
            if info is None:
                raise AdapterError(f"lora_name {name!r} is not loaded", reason="not_found")
            info.draining = True
            self._draining.append(info)
            self._cv.notify_all()
        m.ADAPTER_UNLOADS.inc()
        log.info("adapter unloading", name=name, version=info.version, in_flight=info.in_flight)
        return info

    def _reap(self) -> None:
        with self._lock:
            done = [a for a in self._draining if a.in_flight == 0]
            self._draining = [a for a in self._draining if a.in_flight > 0]
        if not done:
            return
        with self._model_lock:
            for a in done:
                self._delete_key(a.key)
            self._active = None
        with self._lock:
            m.LOADED_ADAPTERS.set(len(self._adapters) + len(self._draining))
        for a in done:
            log.info("adapter unloaded", name=a.name, version=a.version)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, Any]:
        with self._lock:
            waiting = len(self._waiting)
        running = sum(len(c.rows) for c in list(self._cohorts.values()))
        return {"waiting": waiting, "running": running, "max_batch_size": self.max_batch_size}

    # ------------------------------------------------------------------ scheduler
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not any(c.rows for c in self._cohorts.values()) \
                        and not any(a.in_flight == 0 for a in self._draining):
                    self._cv.wait(timeout=0.5)
                if self._stop:
                    return
            try:
                self._admit()
                self._decode_all()
                self._reap()
            except Exception as e:  # a fault outside any one forward: never let it kill the server
                log.exception("engine step failed", error=str(e))
                for cohort in list(self._cohorts.values()):
                    for req in cohort.rows:
                        self._finish(req, "error", error=f"engine error: {type(e).__name__}: {e}", fault="engine_error")
                self._cohorts.clear()

    def _running(self) -> int:
        return sum(len(c.rows) for c in self._cohorts.values())

    def _admit(self) -> None:
        room = self.max_batch_size - self._running()
        if room <= 0:
            return
        with self._lock:
            take, self._waiting = self._waiting[:room], self._waiting[room:]
            m.WAITING.set(len(self._waiting))
        groups: dict[str | None, list[_Request]] = {}
        for req in take:
            if req.cancelled:
                self._finish(req, "stop")
                continue
            groups.setdefault(self._cohort_of(req), []).append(req)
        for key, reqs in groups.items():
            try:
                self._prefill(key, reqs)
                continue
            except Exception as e:
                by_adapter = _by_adapter(reqs)
                if len(by_adapter) == 1:
                    self._fail(reqs, e, "prefill")
                    continue
            # Rows of several adapters failed together: retry each adapter's rows on their own, so
            # only the adapter at fault fails its requests.
            for group in by_adapter.values():
                try:
                    self._prefill(key, group)
                except Exception as e:
                    self._fail(group, e, "prefill")

    def _cohort_of(self, req: _Request) -> str | None:
        return "*" if self._mixer is not None else req.key

    def _forward(self, rows: list[_Request], **inputs: Any) -> Any:
        """One model forward for ``rows``, each on its own adapter. Caller holds the model lock."""
        keys = {r.key for r in rows}
        if len(keys) == 1:
            self._activate(next(iter(keys)))
            return self.model(**inputs)
        assert self._mixer is not None, "rows on several adapters need mixed mode"
        assert self._peft is not None
        if self._active is None or not self._active[0]:
            self._peft.base_model.enable_adapter_layers()
        self._active = None  # the experts' active adapter is changed per group
        return self._mixer.forward([r.key or BASE for r in rows], **inputs)

    def _activate(self, key: str | None) -> None:
        """Point the model's LoRA layers at one adapter (or none) for the next forward."""
        want = (key is not None, key)
        if self._peft is None or self._active == want:
            return
        lora = self._peft.base_model
        if key is None:
            lora.disable_adapter_layers()
        else:
            if self._active is None or not self._active[0]:
                lora.enable_adapter_layers()
            self._peft.set_adapter(key, inference_mode=True)
        self._active = want

    def _prefill(self, key: str | None, reqs: list[_Request]) -> None:
        ids, mask, pos = (t.to(self.device) for t in left_pad([r.prompt_ids for r in reqs], self.pad_id))
        cache = DynamicCache()
        with self._model_lock:
            # logits_to_keep=1: a prefill needs the last position's logits only, never (B, P, V)
            out = self._forward(reqs, input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True, logits_to_keep=1)
        kv = KVBatch(cache, mask)
        logits = out.logits[:, -1, :]
        cohort = self._cohorts.get(key) or _Cohort(key)
        logits = logits.float().cpu()
        tokens = sample_next(logits, [r.sampler for r in reqs], self._gen)
        lps, tops = token_logprobs(logits, tokens, [r.params.top_logprobs for r in reqs])
        now = time.perf_counter()
        for r in reqs:
            m.TTFT.observe(now - r.submitted)
        keep = [i for i, (r, t, lp, top) in enumerate(zip(reqs, tokens, lps, tops))
                if not self._on_token(r, t, lp, top)]
        m.TOKENS.inc(len(reqs))
        self._count_tokens(len(reqs))
        if not keep:
            return
        kv.keep(keep)
        rows = [reqs[i] for i in keep]
        if cohort.kv is None or not cohort.rows:
            cohort.kv, cohort.rows = kv, rows
        else:
            cohort.kv.join(kv)
            cohort.rows.extend(rows)
        self._cohorts[key] = cohort

    def _decode_all(self) -> None:
        cohorts = [c for c in self._cohorts.values() if c.rows]
        if not cohorts:
            return
        m.BATCH_SIZE.observe(sum(len(c.rows) for c in cohorts))
        m.RUNNING.set(sum(len(c.rows) for c in cohorts))
        for cohort in cohorts:
            self._decode(cohort)
        for key in [k for k, c in self._cohorts.items() if not c.rows]:
            del self._cohorts[key]

    def _decode(self, cohort: _Cohort) -> None:
        kv = cohort.kv
        assert kv is not None
        try:
            out, step_mask = self._decode_step(cohort)
        except Exception as e:
            if not self._drop_failing(cohort, e):
                return
            try:  # the step again, without the rows of the failing adapters
                out, step_mask = self._decode_step(cohort)
            except Exception as e:
                self._fail(cohort.rows, e, "decode")
                cohort.rows = []
                return
        kv.advance(step_mask)
        logits = out.logits[:, -1, :].float().cpu()
        tokens = sample_next(logits, [r.sampler for r in cohort.rows], self._gen)
        lps, tops = token_logprobs(logits, tokens, [r.params.top_logprobs for r in cohort.rows])
        keep = []
        for i, (r, t, lp, top) in enumerate(zip(cohort.rows, tokens, lps, tops)):
            if r.cancelled:
                self._finish(r, "stop")
            elif not self._on_token(r, t, lp, top):
                keep.append(i)
        m.TOKENS.inc(len(tokens))
        self._count_tokens(len(tokens))
        if len(keep) != len(cohort.rows):
            cohort.rows = [cohort.rows[i] for i in keep]
            kv.keep(keep)

    def _decode_step(self, cohort: _Cohort) -> tuple[Any, torch.Tensor]:
        """One decode forward of the cohort; on failure the KV cache is as it was before."""
        kv = cohort.kv
        assert kv is not None
        width = kv.length
        last = torch.tensor([[r.generated[-1]] for r in cohort.rows], dtype=torch.long, device=self.device)
        step_mask = kv.step_mask()
        pos = kv.positions()
        try:
            with self._model_lock:
                out = self._forward(cohort.rows, input_ids=last, attention_mask=step_mask, position_ids=pos,
                                    past_key_values=kv.cache, use_cache=True)
        except Exception:
            kv.truncate(width)
            raise
        return out, step_mask

    # ------------------------------------------------------------------ faults
    def _drop_failing(self, cohort: _Cohort, error: Exception) -> bool:
        """After a failed decode step: probe each adapter of the cohort alone, fail the rows of
        those that fail, keep the others. True if rows are left to repeat the step with."""
        by_adapter = _by_adapter(cohort.rows)
        faults = {} if len(by_adapter) == 1 else {k: self._probe(rows[0]) for k, rows in by_adapter.items()}
        faults = {k: e for k, e in faults.items() if e is not None}
        if not faults:  # one adapter, or none fails alone: the step's fault is every row's
            self._fail(cohort.rows, error, "decode")
            cohort.rows = []
            return False
        keep = [i for i, r in enumerate(cohort.rows) if r.key not in faults]
        for key, e in faults.items():
            self._fail(by_adapter[key], e, "decode")
        cohort.rows = [cohort.rows[i] for i in keep]
        if keep:
            assert cohort.kv is not None
            cohort.kv.keep(keep)
        return bool(keep)

    def _probe(self, req: _Request) -> Exception | None:
        """Replay ``req`` on its adapter alone, as the engine ran it (prefill of the prompt, then a
        one-token decode step): the exception, if that fails."""
        ids, mask, pos = (t.to(self.device) for t in left_pad([req.prompt_ids], self.pad_id))
        cache = DynamicCache()
        try:
            with self._model_lock:
                self._forward([req], input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                              use_cache=True)
                if req.generated:
                    last = torch.tensor([[req.generated[-1]]], dtype=torch.long, device=self.device)
                    self._forward([req], input_ids=last, attention_mask=torch.cat([mask, mask.new_ones(1, 1)], dim=1),
                                  position_ids=pos[:, -1:] + 1, past_key_values=cache, use_cache=True)
            return None
        except Exception as e:
            return e

    def _fail(self, reqs: list[_Request], error: Exception, stage: str) -> None:
        """Answer ``reqs`` (all on one adapter, or a whole failed step) with an error."""
        names = sorted({r.adapter.name if r.adapter else BASE_VERSION for r in reqs})
        log.error("forward failed", stage=stage, adapters=names, requests=len(reqs),
                  error=f"{type(error).__name__}: {error}"[:500])
        for r in reqs:
            who = f"adapter {r.adapter.name!r} ({r.adapter.version})" if r.adapter else "the base model"
            self._finish(r, "error", error=f"{who} failed: {type(error).__name__}: {str(error)[:300]}",
                         fault="forward_error")

    def health(self) -> dict[str, Any]:
        """Per-model request outcomes: ``base`` and every loaded (or draining) adapter."""
        with self._lock:
            adapters = list(self._adapters.values()) + list(self._draining)
        out = {BASE_VERSION: {"version": BASE_VERSION, **self.base_health.public()}}
        for a in adapters:
            out[a.name] = {"version": a.version, "draining": a.draining, **a.health.public()}
        return out

    def _count_tokens(self, n: int) -> None:
        now = time.monotonic()
        self._tok_window.append((now, n))
        while self._tok_window and now - self._tok_window[0][0] > 5.0:
            self._tok_window.pop(0)
        span = max(now - self._tok_window[0][0], 0.5)
        m.TOKENS_PER_SECOND.set(sum(k for _, k in self._tok_window) / span)

    # ------------------------------------------------------------------ text
    def _on_token(self, r: _Request, token: int, logprob: float, top: list[tuple[int, float]]) -> bool:
        """Record one sampled token and its raw log-prob; stream what is safe to show. True if the
        request finished."""
        if token in self.stop_ids and not r.params.ignore_eos:
            r.stop_token, r.stop_logprob = token, logprob
            if r.params.top_logprobs:
                r.stop_top = tuple(top)
            self._finish(r, "stop")
            return True
        r.generated.append(token)
        r.logprobs.append(logprob)
        if r.params.top_logprobs:
            r.top_logprobs.append(tuple(top))
        # Only the new token's text is decoded, so a token costs the same at any answer length.
        # The sent text never ends in a stop string's prefix, so a stop string can only start
        # in the pending text.
        r.pending += r.detokenizer.step(self.tokenizer, r.generated)
        stops = r.params.stop
        if stops:
            hits = [i for i in (r.pending.find(s) for s in stops) if i >= 0]
            if hits:
                self._emit(r, r.pending[: min(hits)])
                self._finish(r, "stop", text=self._text(r.generated)[: r.emitted])
                return True
        if len(r.generated) >= r.params.max_tokens:
            self._finish(r, "length")
            return True
        safe = len(r.pending)
        for s in stops:  # hold back a suffix that may be the start of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if r.pending.endswith(s[:k], 0, safe):
                    safe -= k
                    break
        self._emit(r, r.pending[:safe])
        return False

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _emit(self, r: _Request, text: str) -> None:
        """Send ``text``, the next piece of pending text (or of the final text, at the finish)."""
        if text:
            delta = Delta(text)
            k = r.streamed_tokens
            delta.token_ids, delta.logprobs = tuple(r.generated[k:]), tuple(r.logprobs[k:])
            delta.top_logprobs = tuple(r.top_logprobs[k:]) if r.params.top_logprobs else None
            r.streamed_tokens = len(r.generated)
            self._send(r, ("delta", delta))
            r.emitted += len(text)
            r.pending = r.pending[len(text):]

    def _finish(self, r: _Request, reason: str, text: str | None = None, error: str | None = None,
                fault: str | None = None) -> None:
        """End ``r``. ``fault``: why it failed (a metric label), for error finishes."""
        if r.done:
            return
        r.done = True
        health = r.adapter.health if r.adapter is not None else self.base_health
        if error is not None:
            m.REQUESTS_FAILED.labels(adapter=r.adapter.name if r.adapter else BASE_VERSION,
                                     reason=fault or "engine_error").inc()
            if fault == "forward_error":
                with self._lock:
                    was = health.healthy
                    health.record(error)
                if was and not health.healthy:
                    log.error("model unhealthy", adapter=r.adapter.name if r.adapter else BASE_VERSION,
                              consecutive_failures=health.consecutive_failures, error=error)
        elif not r.cancelled:
            with self._lock:
                health.record(None)
        if text is None:
            text = self._text(r.generated)
            if not r.cancelled and error is None:  # end of sequence or max_tokens: send what was held back
                self._emit(r, text[r.emitted:])
        if r.adapter is not None:
            with self._lock:
                r.adapter.in_flight -= 1
        info = r.adapter
        stop = (r.stop_token,) if r.stop_token is not None else ()
        stop_lp = (r.stop_logprob,) if r.stop_token is not None else ()
        self._send(r, ("done", Finished(
            text=text, finish_reason=reason, prompt_tokens=len(r.prompt_ids), completion_tokens=len(r.generated),
            adapter=info.name if info else None, version=info.version if info else BASE_VERSION, error=error,
            fault=(fault or "engine_error") if error is not None else None,
            # As vLLM reports them: the stop token that ended the answer is its last token (the
            # text leaves it out), so the logged tokens are exactly what a trainer replays.
            token_ids=tuple(r.generated) + stop, logprobs=tuple(r.logprobs) + stop_lp,
            top_logprobs=(tuple(r.top_logprobs) + ((r.stop_top,) if stop else ())) if r.params.top_logprobs else None,
            stop_token=r.stop_token, stop_logprob=r.stop_logprob,
        )))

    @staticmethod
    def _send(r: _Request, event: tuple[str, Any]) -> None:
        try:
            r.sink(event)
        except Exception as e:  # a consumer that went away must not break the engine
            log.warning("request sink failed", rid=r.rid, error=str(e))


def _by_adapter(reqs: list[_Request]) -> dict[str | None, list[_Request]]:
    groups: dict[str | None, list[_Request]] = {}
    for r in reqs:
        groups.setdefault(r.key, []).append(r)
    return groups
