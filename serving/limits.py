"""Rate limits of the guard (:mod:`serving.guard`): token buckets, one per key (a token name, a
client address), in memory only. Reads and writes nothing."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return True
            return False


class RateLimits:
    """Token buckets by key (a token name, a client address), at most ``max_keys`` of them: the
    least recently used bucket is dropped first (it comes back full, which only forgives a client
    idle long enough to fall out)."""

    def __init__(self, rate: float, burst: int, max_keys: int) -> None:
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.buckets: OrderedDict[str, list[float]] = OrderedDict()
        self.lock = threading.Lock()

    def take(self, key: str) -> bool:
        now = time.monotonic()
        with self.lock:
            b = self.buckets.get(key)
            if b is None:
                b = self.buckets[key] = [float(self.burst), now]
                while len(self.buckets) > self.max_keys:
                    self.buckets.popitem(last=False)
            else:
                self.buckets.move_to_end(key)
                b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
                b[1] = now
            if b[0] >= 1:
                b[0] -= 1
                return True
            return False
