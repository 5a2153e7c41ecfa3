"""Request bodies of the HTTP API (OpenAI-compatible, vLLM's LoRA admin API, looprl extensions).

Unknown OpenAI fields are accepted and ignored (clients send many optional knobs), but the
ones whose non-default value would change the answer and that this server does not implement
(``n > 1``, ``logprobs``, ``echo``, ``best_of``) are refused with a 400 naming the field.

Every number a client sends is bounded here, so nothing downstream (the engine, torch) ever
sees a value it would raise on: ``seed`` is a 64-bit signed integer, as in vLLM, and floats
refuse NaN and infinities. Text sizes are bounded by the server's body limit and prompt cap
(``serving.max_body_bytes``, ``serving.max_prompt_chars``), applied in ``looprl.serving.app``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from looprl.serving.sampling import SamplingParams

# torch seeds a generator from a 64-bit integer; vLLM accepts the signed range.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
# Far above any model's context: the engine cuts max_tokens to the room the prompt leaves.
MAX_TOKENS_LIMIT = 1 << 20
# A stop string is searched in the pending text at every token: keep that search short.
MAX_STOP_CHARS = 256


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=128)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: bool = False  # vLLM extension
    # vLLM extension: the answer carries its completion's token ids (``choices[i].token_ids``).
    return_token_ids: bool = False

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def answer_tokens(self) -> int | None:
        return self.max_tokens

    def to_sampling_params(self, default_max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.answer_tokens() or default_max_tokens, temperature=self.temperature,
                              top_p=self.top_p, stop=self.stop_list(), seed=self.seed, ignore_eos=self.ignore_eos)


class CompletionRequest(_OpenAIBody):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None  # the validators below bound these to what is served
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt string is supported")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: int | None) -> int | None:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError("best_of > 1 is not supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_OpenAIBody):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool) -> bool:
        if v:
            raise ValueError("logprobs are not supported")
        return v

    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens  # OpenAI deprecated max_tokens for chat


class LoadLoraRequest(BaseModel):
    """vLLM's body for POST /v1/load_lora_adapter."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_path: str
    # looprl extension: serve a version whose manifest status is rejected or rolled_back (an
    # operator's decision; the controller never sends it).
    force: bool = False


class UnloadLoraRequest(BaseModel):
    """vLLM's body for POST /v1/unload_lora_adapter."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str
    lora_int_id: int | None = Field(None, ge=0, le=2**31 - 1)  # vLLM's id; ignored here


class CanarySpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str | None
    share: float = Field(gt=0.0, lt=1.0, allow_inf_nan=False)


class AliasRequest(BaseModel):
    """looprl extension: point an alias at an adapter (None or the base model name: the base),
    optionally with a canary. Applied atomically."""

    model_config = ConfigDict(extra="forbid")
    alias: str = Field(min_length=1, max_length=64)
    lora_name: str | None
    canary: CanarySpec | None = None
