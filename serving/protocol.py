"""Request bodies of the HTTP API (OpenAI-compatible, vLLM's LoRA admin API, looprl extensions).

Unknown OpenAI fields are accepted and ignored (clients send many optional knobs: ``store``,
``metadata``, ``parallel_tool_calls``...), but a field whose non-default value would change the
answer and that this server does not implement (tools, structured output, echo,
``best_of``, images and audio, vLLM's guided decoding and extra penalties...) is refused with a
400 naming the field: ``unsupported()``, listed in ``UNSUPPORTED``. Nothing is silently ignored.
A combination that OpenAI refuses (``top_logprobs`` without ``logprobs: true``) is refused the
same way by ``invalid()``.

Log-probs: chat's ``logprobs: true`` with ``top_logprobs`` 0..20, and the legacy completions'
``logprobs`` 0..5, as OpenAI bounds them. The values are raw log-probs of the model
(``looprl.serving.sampling.token_logprobs``), as vLLM reports them by default.

looprl extension ``looprl_compare`` ("auto" | "always" | "never"; chat, n = 1): "auto" may answer
with a second candidate for a "which is better?" question (``looprl.serving.compare``), "always"
does (the product shows two answers and asks).

Every number a client sends is bounded here, so nothing downstream (the engine, torch) ever
sees a value it would raise on: ``seed`` is a 64-bit signed integer, as in vLLM, and floats
refuse NaN and infinities. Text sizes are bounded by the server's body limit and prompt cap
(``serving.max_body_bytes``, ``serving.max_prompt_chars``), applied in ``looprl.serving.app``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The seed range and the seeds of n > 1 choices are shared with the gateway's response logging.
from looprl.serving.attribution import SEED_MAX, SEED_MIN, choice_seed
from looprl.serving.sampling import (
    LOGIT_BIAS_LIMIT, MAX_LOGIT_BIAS_TOKENS, MAX_TOP_LOGPROBS, PENALTY_LIMIT, SamplingParams,
)

# Far above any model's context: the engine cuts max_tokens to the room the prompt leaves.
MAX_TOKENS_LIMIT = 1 << 20
# A stop string is searched in the pending text at every token: keep that search short.
MAX_STOP_CHARS = 256
# OpenAI's bound on n (choices per request); the server also refuses more than its queue holds.
MAX_CHOICES = 128
# top_k is clamped to the vocabulary by the sampler; this only keeps the number an integer torch takes.
MAX_TOP_K = 2**31 - 1
# OpenAI's cap on the legacy completions' logprobs (alternatives per token).
MAX_COMPLETION_LOGPROBS = 5


def _off(v: Any) -> bool:
    """Unset, or a value that asks for nothing (false, 0, empty)."""
    return v is None or v is False or v == 0 or v == "" or v == [] or v == {}


# Fields whose non-default value would change the answer and that this server does not implement:
# name -> (does the value ask for nothing?, why it is refused). Checked by ``_OpenAIBody.unsupported``.
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_off, "tool calling is not supported by this server"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported by this server"),
    "functions": (_off, "function calling is not supported by this server"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported by this server"),
    "response_format": (lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
                        "only response_format {\"type\": \"text\"} is supported (no JSON mode or schema)"),
    "echo": (_off, "echo is not supported"),
    "best_of": (lambda v: v in (None, 1), "best_of > 1 is not supported; use n"),
    "suffix": (_off, "suffix (insertion) is not supported"),
    "audio": (_off, "audio output is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality is supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    # vLLM's extensions that change what is generated
    "use_beam_search": (_off, "beam search is not supported"),
    "min_tokens": (_off, "min_tokens is not supported"),
    "min_p": (_off, "min_p is not supported"),
    "repetition_penalty": (lambda v: v in (None, 1, 1.0), "repetition_penalty is not supported; use "
                           "presence_penalty or frequency_penalty"),
    "length_penalty": (lambda v: v in (None, 1, 1.0), "length_penalty (beam search) is not supported"),
    "stop_token_ids": (_off, "stop_token_ids is not supported; use stop"),
    "bad_words": (_off, "bad_words is not supported; use logit_bias"),
    "allowed_token_ids": (_off, "allowed_token_ids is not supported; use logit_bias"),
    "prompt_logprobs": (_off, "prompt_logprobs is not supported"),
    "include_stop_str_in_output": (_off, "include_stop_str_in_output is not supported"),
    "guided_json": (_off, "guided decoding is not supported"),
    "guided_regex": (_off, "guided decoding is not supported"),
    "guided_choice": (_off, "guided decoding is not supported"),
    "guided_grammar": (_off, "guided decoding is not supported"),
    "structured_outputs": (_off, "structured outputs are not supported"),
    "chat_template": (_off, "a per-request chat_template is not supported: prompts are rendered with the "
                      "base's template, as training renders them"),
    "continue_final_message": (_off, "continue_final_message is not supported"),
    "add_generation_prompt": (lambda v: v is None or v is True, "add_generation_prompt=false is not supported"),
}
# Message fields that would change the answer: a message carrying one of these is refused.
UNSUPPORTED_IN_MESSAGES: dict[str, str] = {
    "tool_calls": "tool calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "audio": "audio is not supported",
}


class _OpenAIBody(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOP_K)  # vLLM extension; 0 or -1: no limit
    presence_penalty: float | None = Field(None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT, allow_inf_nan=False)
    # token id -> bias added to its logit; ids are checked against the vocabulary by the server
    logit_bias: dict[int, float] | None = Field(None, max_length=MAX_LOGIT_BIAS_TOKENS)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=128)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    ignore_eos: bool = False  # vLLM extension
    # vLLM extension: the answer carries its completion's token ids (``choices[i].token_ids``).
    return_token_ids: bool = False

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v: dict[int, float] | None) -> dict[int, float] | None:
        for tok, bias in (v or {}).items():
            if tok < 0:
                raise ValueError(f"token id {tok} is negative")
            if not (math.isfinite(bias) and -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT):
                raise ValueError(f"the bias of token {tok} must be between -{LOGIT_BIAS_LIMIT:g} and "
                                 f"{LOGIT_BIAS_LIMIT:g}, got {bias}")
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

    def seed_of(self, index: int) -> int | None:
        """The seed choice ``index`` is sampled with (``choice_seed``)."""
        return None if self.seed is None else choice_seed(self.seed, index)

    def alternatives(self) -> int:
        """How many most likely tokens to report per generated token (0: none)."""
        return 0

    def wants_logprobs(self) -> bool:
        """Whether the answer carries log-probs (the response log always has them)."""
        return False

    def to_sampling_params(self, default_max_tokens: int, index: int = 0) -> SamplingParams:
        """The engine's parameters for choice ``index`` (choices differ only in their seed)."""
        return SamplingParams(
            max_tokens=self.answer_tokens() or default_max_tokens, temperature=self.temperature, top_p=self.top_p,
            stop=self.stop_list(), seed=self.seed_of(index), ignore_eos=self.ignore_eos, top_k=self.top_k or 0,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=tuple(sorted((self.logit_bias or {}).items())), top_logprobs=self.alternatives(),
        )

    def invalid(self) -> tuple[str, str] | None:
        """``(param, message)`` of a combination of fields that is refused, or None."""
        compare = (self.model_extra or {}).get("looprl_compare")
        if compare not in (None, "never"):
            return "looprl_compare", "looprl_compare: targeted comparisons are offered on chat completions only"
        return None

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, message)`` of the first field this server would not honour (``UNSUPPORTED``),
        or None. Fields named in the body only: defaults are always honoured."""
        values = {**(self.model_extra or {}), **{k: getattr(self, k) for k in self.model_fields_set}}
        for name, (honoured, why) in UNSUPPORTED.items():
            if name in values and not honoured(values[name]):
                return name, f"{name}: {why}"
        return None


class CompletionRequest(_OpenAIBody):
    prompt: str | list[str]
    # Typed here so a wrong type is named as such; any non-default value is refused (UNSUPPORTED).
    echo: bool = False
    # OpenAI's legacy log-probs: the sampled token's and this many alternatives' (0..5), per token.
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt string is supported")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def alternatives(self) -> int:
        return self.logprobs or 0

    def wants_logprobs(self) -> bool:
        return self.logprobs is not None


class TextPart(BaseModel):
    """A part of a message's content. Only text parts are served; a part of another type (an
    image, audio, a file) passes validation here and is refused by ``unsupported`` with its place."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: str | None = None

    @model_validator(mode="after")
    def _text_has_text(self) -> "TextPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs its 'text'")
        return self


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class ChatCompletionRequest(_OpenAIBody):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None
    # Alternatives per token (0..20, OpenAI's cap); needs logprobs: true, as OpenAI requires.
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # looprl extension: "auto" may answer with a second candidate to compare, "always" does (n = 1
    # only); None: the server's default (serving.compare).
    looprl_compare: Literal["auto", "always", "never"] | None = None
    # looprl extension: the model of the comparison's second candidate (the gateway routes the alias
    # itself and names the canary split's other arm here); None: the answer's own, or the other arm.
    looprl_compare_model: str | None = Field(None, min_length=1, max_length=256)

    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens  # OpenAI deprecated max_tokens for chat

    def alternatives(self) -> int:
        return (self.top_logprobs or 0) if self.logprobs else 0

    def wants_logprobs(self) -> bool:
        return bool(self.logprobs)

    def invalid(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs: logprobs must be set to true when top_logprobs is given"
        if self.looprl_compare in ("auto", "always") and self.n > 1:
            return "looprl_compare", (f"looprl_compare: \"{self.looprl_compare}\" needs n = 1 "
                                      "(the comparison is the second candidate)")
        return None

    def unsupported(self) -> tuple[str, str] | None:
        refused = super().unsupported()
        if refused is not None:
            return refused
        for i, msg in enumerate(self.messages):
            extra = msg.model_extra or {}
            for name, why in UNSUPPORTED_IN_MESSAGES.items():
                if not _off(extra.get(name)):
                    return f"messages[{i}].{name}", f"messages[{i}].{name}: {why}"
            for j, part in enumerate(msg.content if isinstance(msg.content, list) else ()):
                if part.type != "text":
                    where = f"messages[{i}].content[{j}]"
                    return f"{where}.type", (f"{where}: content parts of type {part.type!r} are not supported; "
                                             "this server reads text parts only")
        return None


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
