"""Snapshots of finished prompts, found again by their longest shared prefix (llama-server's prompt cache idea).

Every position of a snapshot is tagged (runtime/prompt.Prompt.positions): text ids, (image sha256, row) for the
image's feature rows, generated ids. A new request reuses the entry that shares the most leading positions with
its own prompt, provided the shared part covers the whole image (reusing only "[INST] " would still need the
vision encoder and saves nothing). That one rule serves a second question about the same image (the entry of the
first question shares "[INST] " + the image), a follow-up turn of a conversation (the previous turn's prompt and
answer are the new prompt's prefix) and a server client that resends the whole history every turn.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Sequence

from .kv import Snapshot


class PromptCache:
    def __init__(self, max_entries: int = 4, max_bytes: int = 1 << 30):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[tuple, Snapshot] = OrderedDict()  # positions -> snapshot, oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._entries.values())

    def best(
        self, positions: Sequence[Any], at_least: int, extra: tuple[Snapshot, ...] = ()
    ) -> tuple[Snapshot | None, int]:
        """The snapshot (cached, or one of `extra`) sharing the most leading positions with `positions`, and how
        many it shares; (None, 0) unless that is at least `at_least`."""
        with self._lock:
            cands = [*extra, *self._entries.values()]
        best, n = None, 0
        for s in cands:
            k = s.shared_prefix(positions)
            if k > n:
                best, n = s, k
        if best is None or n < at_least:
            return None, 0
        with self._lock:
            if best.positions in self._entries:
                self._entries.move_to_end(best.positions)
        return best, n

    def covers(self, positions: Sequence[Any]) -> bool:
        """An entry already holds all of `positions` (no need to store them again)."""
        with self._lock:
            return any(
                s.length >= len(positions) and s.positions[: len(positions)] == tuple(positions)
                for s in self._entries.values()
            )

    def put(self, snap: Snapshot) -> None:
        if self.max_entries <= 0 or snap.nbytes > self.max_bytes:
            return
        with self._lock:
            # an entry that is a prefix of the new one is redundant: the new one serves every prompt it served
            for key in [k for k in self._entries if snap.positions[: len(k)] == k]:
                del self._entries[key]
            self._entries[snap.positions] = snap
            while (
                len(self._entries) > self.max_entries or sum(s.nbytes for s in self._entries.values()) > self.max_bytes
            ):
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
