"""One ``Admin.ApplyDeltas`` call applied to the served states: the refresher's item and user
vectors (to the states serving the delta's model version), item removals, erased users, user
histories, applied table versions and the newest event time (to every arm's state). The whole
call is validated before anything changes; a refusal is :class:`~serving.errors.InvalidArgument`.
Works on the in-memory states only: reads and writes nothing on disk (the caller,
:meth:`serving.service.FreshrecService.apply_deltas`, holds the load lock and audits the call)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from serving.errors import InvalidArgument
from serving.state import ServingState


class Applied(NamedTuple):
    """What one call changed (counted in the first state), and the users it erased."""

    items_upserted: int
    items_removed: int
    users_upserted: int
    users_removed: int
    histories_upserted: int
    removed_users: list[str]


def _check_ids(ids, field: str, named=lambda i: repr(i[:80])) -> None:
    seen: set[str] = set()
    for n, i in enumerate(ids):
        if not i:
            raise InvalidArgument(f"{field}[{n}]: empty id")
        if i in seen:
            raise InvalidArgument(f"{field}[{n}]: {named(i)} appears twice in one call; send "
                                  "each id once")
        seen.add(i)


def _vector(v, field: str, n: int, dim: int, who: str, bound: float) -> np.ndarray:
    a = np.asarray(v.values, dtype=np.float32)
    if a.shape != (dim,):
        raise InvalidArgument(f"{field}[{n}] ({who}) has {a.size} values; the index has "
                              f"dimension {dim}")
    if not np.all(np.isfinite(a)):
        raise InvalidArgument(f"{field}[{n}] ({who}) holds NaN or infinite values")
    norm = float(np.linalg.norm(a.astype(np.float64)))
    if norm > bound:
        raise InvalidArgument(f"{field}[{n}] ({who}) has norm {norm:.4g}, above "
                              f"serving.max_vector_norm {bound:g}")
    return a


def apply_delta(request, states: list[ServingState], target: str, users: Callable[[str], str],
                bound: float) -> Applied:
    """Apply ``request`` (an ApplyDeltasRequest) to ``states`` (every arm's distinct state).
    Vectors belong to one model's space: they go to the states serving ``target`` (the request's
    model version, else the control arm's); everything else to every state (histories are
    model-independent; each state folds them in itself). ``users`` maps the request's user ids
    to pseudonyms; ``bound``: ``serving.max_vector_norm``."""
    targets = [st for st in states if st.model_version == target]
    if (request.upsert_items or request.upsert_users) and not targets:
        raise InvalidArgument(f"no arm serves {target!r}: item/user vectors not applied "
                              f"(serving: {sorted({st.model_version for st in states})})")
    # validate the whole call before changing anything
    item_ids = [v.id for v in request.upsert_items]
    _check_ids(item_ids, "upsert_items")
    _check_ids(list(request.remove_items), "remove_items")
    both = set(item_ids) & set(request.remove_items)
    if both:
        raise InvalidArgument(f"item {sorted(both)[0][:80]!r} is both upserted and removed "
                              "in one call")
    user_ids = [users(v.id) for v in request.upsert_users]
    _check_ids(user_ids, "upsert_users", named=lambda u: f"user {u[:40]}")
    removed_users = [users(u) for u in request.remove_users]
    _check_ids(removed_users, "remove_users", named=lambda u: f"user {u[:40]}")
    _check_ids([users(h.user_id) for h in request.upsert_histories],
               "upsert_histories", named=lambda u: f"user {u[:40]}")
    vectors = []
    for st in targets:
        dim = st.items.dim
        items_up = [(v.id, _vector(v, "upsert_items", n, dim, f"item {v.id[:80]!r}", bound))
                    for n, v in enumerate(request.upsert_items)]
        users_up = {u: _vector(v, "upsert_users", n, dim, f"user {u[:40]}", bound)
                    for n, (u, v) in enumerate(zip(user_ids, request.upsert_users))}
        vectors.append((st, items_up, users_up))
    for n, h in enumerate(request.upsert_histories):
        if len(h.item_ids) != len(h.weights):
            raise InvalidArgument(f"upsert_histories[{n}]: {len(h.item_ids)} items but "
                                  f"{len(h.weights)} weights")
        if not all(np.isfinite(h.weights)):
            raise InvalidArgument(f"upsert_histories[{n}]: a weight is NaN or infinite")
    n_up = u_up = 0
    for st, items_up, users_up in vectors:
        n_up = st.items.upsert(items_up)
        u_up = st.upsert_users(users_up)
    n_rm = u_rm = h_up = 0
    for n, st in enumerate(states):
        removed = st.items.remove(list(request.remove_items))
        for table, version in request.applied_versions.items():
            st.delta_versions[table] = version
        if request.newest_event_ts:
            st.newest_event_ts = max(st.newest_event_ts or 0.0, request.newest_event_ts)
        # a removed user (erased upstream) loses vector, history and recent events
        gone = sum(st.forget_user(u) for u in removed_users)
        hist = sum(st.set_history(users(h.user_id), list(h.item_ids), list(h.weights))
                   for h in request.upsert_histories)
        if n == 0:
            n_rm, u_rm, h_up = removed, gone, hist
    return Applied(n_up, n_rm, u_up, u_rm, h_up, removed_users)
