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


def _score_filtered(state: ServingState, ui, k: int, filters: Filters, excluded: set[str],
                    overfetch: float) -> list[tuple[str, float]]:
    """Models scored over the history: dense scores over the catalog, best first, filtered."""
    s = np.asarray(state.model.scores([ui])[0], dtype=np.float64)
    cat, n = state.catalog, len(s)
    fetch = int(k * overfetch) + len(excluded) + len(filters.exclude_items)
    while True:
        f = min(max(fetch, 1), n)
        idx = np.argpartition(-s, f - 1)[:f] if f < n else np.arange(n)
        idx = idx[np.argsort(-s[idx], kind="stable")]
        good = [(cat[i], float(s[i])) for i in idx
                if np.isfinite(s[i]) and _qualifies(state, cat[i], filters, excluded)]
        if len(good) >= k or f >= n:
            return good[:k]
        fetch *= 2


def recommend(state: ServingState, user: str, k: int, filters: Filters, context: dict[str, str],
              recent: list[tuple[str, float]], overfetch: float = 2.0) -> Result:
    """Top-k for ``user`` from the served model, with ``recent`` (item, weight) events the
    snapshot does not hold yet counted now (request-time freshness, whatever the model kind)."""
    recent_ids = [i for i, _ in recent]
    history = list(dict.fromkeys(list(reversed(recent_ids)) + sorted(state.seen.get(user, ()))))
    excluded = set(history) if filters.exclude_seen else set()
    source = state.manifest.model_name or "model"
    hits = None
    if state.embedding:
        vec = state.fold_in_user(user, recent) if recent else state.user_vector(user)
        if vec is None and not recent:  # a history without a stored vector: the model makes one
            vec = state.fold_in_user(user, [])
        if vec is not None:
            hits = _search_filtered(state, vec, k, filters, excluded, overfetch)
            items = [Scored(i, s, source, _because(state, i, history)) for i, s in hits]
    else:
        ui = state.user_input(user, recent)
        if len(ui.items):
            hits = _score_filtered(state, ui, k, filters, excluded, overfetch)
            why = f"{source} over your {len(ui.items)} items"
            items = [Scored(i, s, source, why) for i, s in hits]
    if hits is not None:
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
    pos = state.items.position.get(item_id)
    if pos is None:
        raise NotFound(f"item {item_id!r} is not in the served catalog")
    if state.embedding:
        hits = _search_filtered(state, state.items.vector(item_id), k, filters, {item_id}, overfetch)
        source = "item_vectors"
    else:
        from recmodels.servable import ItemItemServable

        own = isinstance(state.model, ItemItemServable)  # kNN, EASE: the model's own lists
        if not own and state.neighbors is not None and state.neighbors[pos].nnz:
            row = state.neighbors[pos]
            order = np.argsort(-row.data, kind="stable")
            hits = [(state.catalog[i], float(v)) for i, v in
                    zip(row.indices[order], row.data[order])
                    if _qualifies(state, state.catalog[i], filters, {item_id})][:k]
            return Result([Scored(i, s, "item_neighbors", f"often together with {item_id}")
                           for i, s in hits], state.model_version)
        fetch = int(k * overfetch) + len(filters.exclude_items) + 1
        hits = []
        while True:
            top, sims = state.model.similar_items(pos, fetch)
            hits = [(state.catalog[i], float(v)) for i, v in zip(top, sims)
                    if _qualifies(state, state.catalog[i], filters, {item_id})]
            if len(hits) >= k or fetch >= len(state.catalog):
                break
            fetch *= 2
        hits = hits[:k]
        source = state.manifest.model_name or "model"
    return Result([Scored(i, s, source, f"close to {item_id}") for i, s in hits],
                  state.model_version)
