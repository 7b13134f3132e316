"""A token bucket per key (a device): a burst at once, then a steady rate. Pure: the caller passes the time.

Memory: a bucket that has refilled to its full burst says nothing a missing bucket
would not, so ``forget_idle`` drops those; and at most ``max_keys`` buckets exist
at once (a new key past that is refused until some have refilled).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    at_ms: int


class RateLimiter:
    def __init__(self, burst: int, per_s: float, max_keys: int = 100_000) -> None:
        if burst < 1 or per_s <= 0:
            raise ValueError("a rate limit needs a burst of at least 1 and a positive rate")
        self.burst = burst
        self.per_ms = per_s / 1000
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, now_ms: int) -> int:
        """Spend one token of ``key``: 0 if allowed, else how many ms until one is available."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys and not self.forget_idle(now_ms):
                return max(1, round(1 / self.per_ms))
            bucket = self._buckets[key] = _Bucket(float(self.burst), now_ms)
        self._refill(bucket, now_ms)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0
        return max(1, int((1 - bucket.tokens) / self.per_ms + 0.999))

    def forget_idle(self, now_ms: int) -> int:
        """Drop the buckets that are full again; return how many."""
        idle = [key for key, b in self._buckets.items() if self._refill(b, now_ms) >= self.burst]
        for key in idle:
            del self._buckets[key]
        return len(idle)

    @property
    def tracked(self) -> int:
        return len(self._buckets)

    def _refill(self, bucket: _Bucket, now_ms: int) -> float:
        elapsed = max(0, now_ms - bucket.at_ms)  # a clock that steps back refills nothing
        bucket.tokens = min(float(self.burst), bucket.tokens + elapsed * self.per_ms)
        bucket.at_ms = max(bucket.at_ms, now_ms)
        return bucket.tokens
