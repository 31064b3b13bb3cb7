"""Request logic, pure and apart from gRPC: recommendations and similar items over a state.

Filters (categories, excluded items, seen items) are applied before the top-k cut: k candidates
plus one per excluded item are fetched (over-fetched by ``overfetch`` under a category filter) and
the fetch doubles until k qualify or the index is exhausted, so k results come back whenever k
items qualify. Users without a vector (cold start) get items from the categories in their
request context, then the most popular items, through the same filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from serving.state import ServingState


class NotFound(LookupError):
    """The item asked about is not in the served catalog."""


@dataclass(frozen=True)
class Filters:
    include_categories: frozenset[str] = frozenset()
    exclude_items: frozenset[str] = frozenset()
    exclude_seen: bool = True


class Scored(NamedTuple):
    item_id: str
    score: float
    source: str
    explanation: str = ""


@dataclass(frozen=True)
class Result:
    items: list[Scored]
    model_version: str
    cold_start: bool = False


def _id_of(state: ServingState, pos: int) -> str | None:
    """The item id at a served position: the catalog's (the snapshot's positions), or, past it,
    the index's (items upserted since)."""
    cat = state.catalog
    return cat[pos] if pos < len(cat) else state.items.item_ids[pos]


class Excluded:
    """What one request must not return: served positions (the user's history and recent events,
    ints) and the ids of ``Filters.exclude_items``. Ids of the positions are made only when a
    candidate sits past the snapshot's catalog (an item upserted since the snapshot, whose new
    position the history does not know) or for the cold-start fill."""

    __slots__ = ("state", "pos", "items", "_ids")

    def __init__(self, state: ServingState, pos: set[int], items: frozenset[str] = frozenset()):
        self.state, self.pos, self.items, self._ids = state, pos, items, None

    def __len__(self) -> int:
        return len(self.pos) + len(self.items)

    def ids(self) -> set[str]:
        if self._ids is None:
            self._ids = {i for i in (_id_of(self.state, p) for p in self.pos) if i is not None}
        return self._ids

    def add(self, pos: int, item: str) -> None:
        self.pos.add(pos)
        if self._ids is not None:
            self._ids.add(item)

    def drops(self, pos: int, item: str) -> bool:
        if pos in self.pos or item in self.items:
            return True
        return pos >= len(self.state.catalog) and bool(self.pos) and item in self.ids()


def _qualifies(state: ServingState, item: str, filters: Filters, excluded: set[str]) -> bool:
    """By id (similar items, the cold-start fill): served, not excluded, in a wanted category."""
    if item in excluded or item in filters.exclude_items or item not in state.items.position:
        return False  # (not in the index: removed since the snapshot, e.g. deactivated)
    if filters.include_categories:
        return bool(state.categories.get(item, frozenset()) & filters.include_categories)
    return True


def _wanted(state: ServingState, pos: int, item: str, filters: Filters,
            excluded: Excluded) -> bool:
    """By position (a candidate the index or the model returned, known to be served)."""
    if excluded.drops(pos, item):
        return False
    if filters.include_categories:
        return bool(state.categories.get(item, frozenset()) & filters.include_categories)
    return True


def _search_filtered(state: ServingState, query: np.ndarray, k: int, filters: Filters,
                     excluded: Excluded, overfetch: float) -> list[tuple[int, str, float]]:
    """The best ``k`` (position, item id, score) that pass the filters. Only a category filter
    drops an unknown share of candidates: it alone is over-fetched for."""
    cats = filters.include_categories
    fetch = (int(k * overfetch) if cats else k) + len(excluded)
    pos, ids, ncat = excluded.pos, excluded.items, len(state.catalog)
    # the common case: only positions to drop, and no item upserted since the snapshot (whose
    # new position the history could not know)
    plain = not ids and not cats and state.items.n_vectors <= ncat
    while True:
        hits = state.items.search_positions(query, fetch)
        if plain:
            good = [h for h in hits if h[0] not in pos]
        else:
            good = []
            for h in hits:  # _wanted, inlined (per candidate)
                q, item = h[0], h[1]
                if q in pos or (ids and item in ids) or \
                        (q >= ncat and pos and item in excluded.ids()):
                    continue
                if cats and not state.categories.get(item, frozenset()) & cats:
                    continue
                good.append(h)
        if len(good) >= k or fetch >= state.items.size:
            return good[:k]
        fetch *= 2


def _because(state: ServingState, hits: list[tuple[int, str, float]], history: list[str]) -> list[str]:
    """Per result: the item of the user's history (newest events first, at most 50 items) whose
    vector is closest to it."""
    position, vectors = state.items.position, state.items.vectors
    known = [(h, p) for h in history[:50] if (p := position.get(h)) is not None]
    if not known:
        return ["matches your taste profile"] * len(hits)
    sims = vectors[[q for q, _, _ in hits]] @ vectors[[p for _, p in known]].T
    best = np.argmax(sims, axis=1)
    return [f"similar to {known[b][0]}, which you interacted with" for b in best.tolist()]


def _score_filtered(state: ServingState, ui, k: int, filters: Filters, excluded: Excluded,
                    overfetch: float) -> list[tuple[int, str, float]]:
    """Models scored over the history: dense scores over the catalog, best first, filtered."""
    s = np.asarray(state.model.scores([ui])[0], dtype=np.float64)
    cat, n, live = state.catalog, len(s), state.items.position
    fetch = int(k * overfetch) + len(excluded)
    while True:
        f = min(max(fetch, 1), n)
        idx = np.argpartition(-s, f - 1)[:f] if f < n else np.arange(n)
        idx = idx[np.argsort(-s[idx], kind="stable")]
        good = [(i, cat[i], float(s[i])) for i in idx.tolist()
                if np.isfinite(s[i]) and cat[i] in live and _wanted(state, i, cat[i], filters,
                                                                     excluded)]
        if len(good) >= k or f >= n:
            return good[:k]
        fetch *= 2


def _rank_filtered(state: ServingState, ui, k: int, filters: Filters,
                   excluded: Excluded) -> list[tuple[int, str, float, str]]:
    """Two-stage models (the hybrid): candidates from the sources' indexes, ordered by the
    ranker, filtered; the ranked pool is all there is (no catalog scan): a user whose filters
    leave fewer than ``k`` gets the rest from the cold-start fill."""
    cat, live = state.catalog, state.items.position
    ((pos, sc, who),) = state.model.rank([ui])
    return [(i, cat[i], float(v), w) for i, v, w in zip(pos.tolist(), sc.tolist(), who)
            if cat[i] in live and _wanted(state, i, cat[i], filters, excluded)][:k]


def recommend(state: ServingState, user: str, k: int, filters: Filters, context: dict[str, str],
              recent: list[tuple[str, float]], overfetch: float = 2.0,
              explain: bool = False) -> Result:
    """Top-k for ``user`` from the served model, with ``recent`` (item, weight) events the
    snapshot does not hold yet counted now (request-time freshness, whatever the model kind).
    ``explain``: fill each item's explanation (else it stays empty)."""
    seen, _, _ = state.history(user)  # catalog positions
    if filters.exclude_seen:
        pos = set(seen.tolist())
        if recent:
            where = state.items.position
            pos.update(q for q in (where.get(i) for i, _ in recent) if q is not None)
    else:
        pos = set()
    excluded = Excluded(state, pos, filters.exclude_items)
    source = state.manifest.model_name or "model"
    hits = None
    if state.embedding:
        vec = state.fold_in_user(user, recent) if recent else state.user_vector(user)
        if vec is None and not recent:  # a history without a stored vector: the model makes one
            vec = state.fold_in_user(user, [])
        if vec is not None:
            hits = _search_filtered(state, vec, k, filters, excluded, overfetch)
            if explain and hits:
                cat = state.catalog
                history = list(dict.fromkeys([i for i, _ in reversed(recent)]
                                             + sorted(cat[p] for p in seen.tolist())))
                whys = _because(state, hits, history)
                items = [Scored(i, s, source, w) for (_, i, s), w in zip(hits, whys)]
            else:
                items = [Scored(i, s, source) for _, i, s in hits]
    else:
        ui = state.user_input(user, recent)
        if len(ui.items) and getattr(state.model, "two_stage", False):
            ranked = _rank_filtered(state, ui, k, filters, excluded)
            hits = [h[:3] for h in ranked]
            items = [Scored(i, s, source, f"proposed by {who}, ranked by {source}"
                            if explain else "") for _, i, s, who in ranked]
        elif len(ui.items):
            hits = _score_filtered(state, ui, k, filters, excluded, overfetch)
            why = f"{source} over your {len(ui.items)} items" if explain else ""
            items = [Scored(i, s, source, why) for _, i, s in hits]
    if hits is not None:
        if len(items) >= k:
            return Result(items, state.model_version)
        for q, i, _ in hits:
            excluded.add(q, i)
        return Result(items + _cold(state, k - len(items), filters, context, excluded, explain),
                      state.model_version)
    return Result(_cold(state, k, filters, context, excluded, explain), state.model_version,
                  cold_start=True)


def _cold(state: ServingState, k: int, filters: Filters, context: dict[str, str],
          excluded: Excluded, explain: bool = False) -> list[Scored]:
    wanted = frozenset(c.strip() for c in context.get("categories", "").split(",") if c.strip())
    out: list[Scored] = []
    taken = set(excluded.ids())
    n = len(state.popular)
    if wanted:
        for rank, item in enumerate(state.popular):
            if len(out) >= k:
                break
            if state.categories.get(item, frozenset()) & wanted \
                    and _qualifies(state, item, filters, taken):
                why = (f"popular in {', '.join(sorted(wanted & state.categories[item]))}"
                       if explain else "")
                out.append(Scored(item, float(n - rank) / n, "content", why))
                taken.add(item)
    for rank, item in enumerate(state.popular):
        if len(out) >= k:
            break
        if _qualifies(state, item, filters, taken):
            out.append(Scored(item, float(n - rank) / n, "popular",
                              "popular right now" if explain else ""))
            taken.add(item)
    return out


def similar_items(state: ServingState, item_id: str, k: int, filters: Filters,
                  overfetch: float = 2.0) -> Result:
    pos = state.items.position.get(item_id)
    if pos is None:
        raise NotFound(f"item {item_id!r} is not in the served catalog")
    if state.embedding:
        hits = [(i, s) for _, i, s in _search_filtered(
            state, state.items.vector(item_id), k, filters, Excluded(state, {pos}, filters.exclude_items),
            overfetch)]
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
