"""A conversation, the one prompt type of the pipeline.

A prompt is what a user sent before the answer: a system prompt, earlier turns, and the last
user turn. Serving receives it as OpenAI ``messages`` (or a plain completion prompt), the event log
stores it (``responses.messages`` as JSON, ``responses.prompt`` as text), and PPO rollouts, the
reward model and the gate read it back from there. Each stage renders it with the base's chat
template (``looprl.policy.model.render_prompt_ids``), so the tokens trained and scored are the
tokens that were served.

``Chat.parse`` is the one place a prompt is read from outside data; ``Chat.key`` is its identity
(the plain text for a single user turn, so prompt files, held-out hashing and old logs keep
working; canonical JSON otherwise).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

ROLES = ("system", "user", "assistant", "tool")


class ChatError(ValueError):
    """A prompt that is not a conversation looprl can render."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Chat:
    messages: tuple[Message, ...]

    def __post_init__(self) -> None:
        if not self.messages:
            raise ChatError("a conversation needs at least one message")
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                raise ChatError(f"messages.{i}.role {m.role!r}: expected one of {', '.join(ROLES)}")
            if not isinstance(m.content, str):
                raise ChatError(f"messages.{i}.content must be text, got {type(m.content).__name__}")

    # ---- construction ----
    @classmethod
    def user(cls, text: str) -> "Chat":
        return cls((Message("user", str(text)),))

    @classmethod
    def from_messages(cls, messages: Iterable[Mapping[str, Any] | Message | Any]) -> "Chat":
        """From dicts ``{"role", "content"}`` or objects with ``role``/``content`` attributes
        (OpenAI's ``developer`` role is the system prompt)."""
        out = []
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, Mapping) else getattr(m, "role", None)
            content = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", None)
            if role is None:
                raise ChatError(f"messages.{i} has no role")
            role = "system" if role == "developer" else str(role)
            out.append(Message(role, "" if content is None else content))
        return cls(tuple(out))

    @classmethod
    def parse(cls, prompt: "str | Chat | list | None" = None, messages: "str | Iterable | None" = None) -> "Chat":
        """A prompt as stored or sent: ``messages`` (a list, or its JSON) when there are any, else
        ``prompt`` as one user turn (a list ``prompt`` is messages, as ``to_json`` writes them);
        a ``Chat`` is returned as is."""
        if isinstance(prompt, Chat):
            return prompt
        if isinstance(prompt, list):
            prompt, messages = None, prompt
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except ValueError as e:
                raise ChatError(f"messages is not valid JSON ({e})") from None
            if not isinstance(messages, list):
                raise ChatError(f"messages JSON must be a list, got {type(messages).__name__}")
        if messages:
            return cls.from_messages(messages)
        if prompt is None:
            raise ChatError("one of prompt or messages is required")
        return cls.user(prompt)

    # ---- views ----
    @property
    def single_turn(self) -> bool:
        return len(self.messages) == 1 and self.messages[0].role == "user"

    def key(self) -> str:
        """Identity of the conversation as one string (stable across processes)."""
        if self.single_turn:
            return self.messages[0].content
        return json.dumps([m.to_dict() for m in self.messages], ensure_ascii=False, separators=(",", ":"))

    def to_dicts(self) -> list[dict[str, str]]:
        return [m.to_dict() for m in self.messages]

    def to_json(self) -> str | list[dict[str, str]]:
        """JSON-ready form that ``parse`` reads back: the text of a single user turn, else messages."""
        return self.messages[0].content if self.single_turn else self.to_dicts()

    def last_user(self) -> str:
        """The last user turn's text (what a topic or a question form is judged on)."""
        for m in reversed(self.messages):
            if m.role == "user":
                return m.content
        return ""

    def text(self) -> str:
        """Human-readable one-string form (logs, reports, the ``prompt`` column)."""
        if self.single_turn:
            return self.messages[0].content
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages)

    def __str__(self) -> str:
        return self.text()
