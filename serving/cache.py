"""The per-user response cache of Recommend: an in-memory LRU of recent replies per (user,
request), with a TTL and invalidation by user (new events) or whole (a load, a delta, an
erasure). Reads and writes nothing on disk."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class UserCache:
    """LRU of recent results per (user, request). An entry dies with the user's new events, any
    delta or snapshot (generation bumps) or its TTL. A result computed before an invalidation is
    never stored after it: ``put`` takes the token read before the work began."""

    def __init__(self, size: int, ttl: float) -> None:
        self.size, self.ttl = size, ttl
        self.data: OrderedDict[tuple, tuple[float, tuple[int, int], object]] = OrderedDict()
        self.user_generation: dict[str, int] = {}  # bounded: cleared (with a generation bump)
        self.max_users = max(1024, 2 * size)
        self.generation = 0
        self.lock = threading.Lock()

    def token(self, user: str) -> tuple[int, int]:
        return self.generation, self.user_generation.get(user, 0)

    def get(self, key: tuple):
        if not self.size:
            return None
        with self.lock:
            hit = self.data.get(key)
            if hit is None:
                return None
            stamp, token, value = hit
            if token != self.token(key[0]) or time.monotonic() - stamp > self.ttl:
                del self.data[key]
                return None
            self.data.move_to_end(key)
            return value

    def put(self, key: tuple, value, token: tuple[int, int]) -> None:
        if not self.size:
            return
        with self.lock:
            if token != self.token(key[0]):
                return
            self.data[key] = (time.monotonic(), token, value)
            self.data.move_to_end(key)
            while len(self.data) > self.size:
                self.data.popitem(last=False)

    def invalidate_user(self, user: str) -> None:
        with self.lock:
            # stale entries fail the token check on get and age out of the LRU
            self.user_generation[user] = self.user_generation.get(user, 0) + 1
            if len(self.user_generation) > self.max_users:  # bounded memory: start over
                self.user_generation.clear()
                self.generation += 1
                self.data.clear()

    def invalidate_all(self) -> None:
        with self.lock:
            self.generation += 1
            self.data.clear()
