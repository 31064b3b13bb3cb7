"""Request logic, pure and apart from gRPC: recommendations and similar items over a state.

Filters (categories, excluded items, seen items) are applied before the top-k cut: candidates are
over-fetched and the fetch doubles until k qualify or the index is exhausted, so k results come back
whenever k items qualify. Users without a vector (cold start) get items from the categories in their
request context, then the most popular items, through the same filters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from serving.state import ServingState


class NotFound(LookupError):
    """The item asked about is not in the served catalog."""


@dataclass(frozen=True)
class Filters:
    include_categories: frozenset[str] = frozenset()
    exclude_items: frozenset[str] = frozenset()
    exclude_seen: bool = True


@dataclass(frozen=True)
class Scored:
    item_id: str
    score: float
    source: str
    explanation: str


@dataclass(frozen=True)
class Result:
    items: list[Scored]
    model_version: str
    cold_start: bool = False


def _qualifies(state: ServingState, item: str, filters: Filters, excluded: set[str]) -> bool:
    if item in excluded or item in filters.exclude_items or item not in state.items.position:
        return False  # (not in the index: removed since the snapshot, e.g. deactivated)
    if filters.include_categories:
        return bool(state.categories.get(item, frozenset()) & filters.include_categories)
    return True


def _search_filtered(state: ServingState, query: np.ndarray, k: int, filters: Filters,
                     excluded: set[str], overfetch: float) -> list[tuple[str, float]]:
    fetch = int(k * overfetch) + len(excluded) + len(filters.exclude_items)
    while True:
        hits = state.items.search(query, fetch)
        good = [(i, s) for i, s in hits if _qualifies(state, i, filters, excluded)]
        if len(good) >= k or fetch >= state.items.size:
            return good[:k]
        fetch *= 2


def _because(state: ServingState, item: str, history: Iterable[str]) -> str:
    vec = state.items.vector(item)
    best, best_score = None, -np.inf
    for h in list(history)[:50]:
        hv = state.items.vector(h)
        if hv is not None and vec is not None:
            s = float(hv @ vec)
            if s > best_score:
                best, best_score = h, s
    return f"similar to {best}, which you interacted with" if best else "matches your taste profile"


def recommend(state: ServingState, user: str, k: int, filters: Filters, context: dict[str, str],
              recent: list[str], overfetch: float = 2.0,
              user_vector: np.ndarray | None = None) -> Result:
    history = list(dict.fromkeys(list(reversed(recent)) + sorted(state.seen.get(user, ()))))
    excluded = set(history) if filters.exclude_seen else set()
    vec = user_vector if user_vector is not None else state.user_vector(user)
    if vec is not None:
        hits = _search_filtered(state, vec, k, filters, excluded, overfetch)
        items = [Scored(i, s, "als", _because(state, i, history)) for i, s in hits]
        if len(items) >= k:
            return Result(items, state.model_version)
        excluded |= {s.item_id for s in items}
        return Result(items + _cold(state, k - len(items), filters, context, excluded),
                      state.model_version)
    return Result(_cold(state, k, filters, context, excluded), state.model_version, cold_start=True)


def _cold(state: ServingState, k: int, filters: Filters, context: dict[str, str],
          excluded: set[str]) -> list[Scored]:
    wanted = frozenset(c.strip() for c in context.get("categories", "").split(",") if c.strip())
    out: list[Scored] = []
    taken = set(excluded)
    n = len(state.popular)
    if wanted:
        for rank, item in enumerate(state.popular):
            if len(out) >= k:
                break
            if state.categories.get(item, frozenset()) & wanted \
                    and _qualifies(state, item, filters, taken):
                out.append(Scored(item, float(n - rank) / n, "content",
                                  f"popular in {', '.join(sorted(wanted & state.categories[item]))}"))
                taken.add(item)
    for rank, item in enumerate(state.popular):
        if len(out) >= k:
            break
        if _qualifies(state, item, filters, taken):
            out.append(Scored(item, float(n - rank) / n, "popular", "popular right now"))
            taken.add(item)
    return out


def similar_items(state: ServingState, item_id: str, k: int, filters: Filters,
                  overfetch: float = 2.0) -> Result:
    vec = state.items.vector(item_id)
    if vec is None:
        raise NotFound(f"item {item_id!r} is not in the served catalog")
    hits = _search_filtered(state, vec, k, filters, {item_id}, overfetch)
    return Result([Scored(i, s, "item_vectors", f"close to {item_id}") for i, s in hits],
                  state.model_version)
