"""A stand-in Kafka producer for tests where only what is *sent* matters (the collector, the
ingest consumer's dead-letter queue): it records every send and acknowledges it, or, ``down``,
fails it as an unreachable broker would."""

from __future__ import annotations

from looprl.ingest.transport import DeliveryFailed


class RecordingProducer:
    def __init__(self, down: bool = False):
        self.down = down
        self.sent: list[tuple[str, bytes | None, bytes | None, dict[str, str]]] = []  # topic, value, key, headers

    @property
    def values(self) -> list[bytes | None]:
        return [value for _topic, value, _key, _headers in self.sent]

    def send(self, topic, value, key=None, headers=None, on_delivery=None):
        if self.down:
            on_delivery(DeliveryFailed("broker down"))
            return
        self.sent.append((topic, value, key, {k: v.decode() for k, v in headers or []}))
        if on_delivery:
            on_delivery(None)

    def flush(self, timeout):
        return 0

    def close(self, timeout=5.0):
        pass
