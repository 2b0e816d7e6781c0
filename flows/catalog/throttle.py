"""Per-client throttle of refused requests: after `limit` refusals within `window_s`, answer 429 for a while.

Tokens have 256 bits of entropy, so this is not what stops guessing; it keeps a misbehaving client from filling
the refusal log and the disk. It is per client address, so clients behind one NAT share a budget.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

_MAX_CLIENTS = 10_000


class RefusalThrottle:
    def __init__(self, limit: int = 30, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window_s, self.clock = limit, window_s, clock
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, client: str, t: float) -> deque[float]:
        q = self._seen.setdefault(client, deque())
        while q and q[0] <= t - self.window_s:
            q.popleft()
        return q

    def retry_after(self, client: str) -> int:
        """Seconds until `client` may try again; 0 when it is not throttled."""
        with self._lock:
            t = self.clock()
            q = self._prune(client, t)
            if len(q) < self.limit:
                if not q:
                    del self._seen[client]
                return 0
            return max(1, int(q[0] + self.window_s - t) + 1)

    def record(self, client: str) -> bool:
        """Count one refusal; True when this one makes the client throttled."""
        with self._lock:
            t = self.clock()
            if len(self._seen) > _MAX_CLIENTS:  # forget idle clients rather than grow without bound
                for c in [c for c, q in self._seen.items() if not q or q[-1] <= t - self.window_s]:
                    del self._seen[c]
            q = self._prune(client, t)
            q.append(t)
            return len(q) == self.limit
