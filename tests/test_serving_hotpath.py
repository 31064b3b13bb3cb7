"""The Recommend hot path on a real server (loopback gRPC, an in-memory ALS-like state over a flat
FAISS index): explanations only when asked, the seen filter by positions (also for items upserted
since the snapshot and for recent events), the standard gRPC metrics."""

from __future__ import annotations

import numpy as np
import pytest

from freshrec.api.client import Client
from tests.test_serving_guard import ADMIN, CLIENT, N_USERS, start


@pytest.fixture
def served(tmp_path):
    server, addr = start(tmp_path)
    client = Client(addr, CLIENT)
    yield server, client
    client.close()
    server.stop(grace=0)


def _history_ids(server, raw: str) -> set[str]:
    state = server.state
    items, _, _ = state.history(server.pseudonym(raw))
    return {state.catalog[p] for p in items.tolist()}


def test_explanations_only_when_requested_and_name_the_closest_history_item(served):
    server, client = served
    state = server.state
    for u in range(5):
        plain = client.recommend(f"u{u}", 10)
        assert len(plain.items) == 10
        assert all(i.explanation == "" for i in plain.items)
        req = client.rec_pb2.RecommendRequest(user_id=f"u{u}", k=10, want_explanations=True)
        told = client.recommender.Recommend(req, metadata=client.metadata, timeout=5)
        assert [i.item_id for i in told.items] == [i.item_id for i in plain.items]
        history = sorted(_history_ids(server, f"u{u}"))
        vec = state.items.vectors
        for it in told.items:
            # the history item with the largest inner product with the served item
            best = max(history, key=lambda h: float(vec[state.items.position[h]]
                                                     @ vec[state.items.position[it.item_id]]))
            assert it.explanation == f"similar to {best}, which you interacted with"


def test_seen_items_are_dropped_unless_asked_not_to(served):
    server, client = served
    state = server.state
    for u in range(N_USERS):
        seen = _history_ids(server, f"u{u}")
        got = [i.item_id for i in client.recommend(f"u{u}", 20).items]
        assert len(got) == 20 and not set(got) & seen
    # a user whose taste is exactly one of their seen items: served first when seen items may be
    user = server.pseudonym("u3")
    first = sorted(_history_ids(server, "u3"))[0]
    state.user_vectors[user] = state.items.vector(first) * 10
    assert client.recommend("u3", 5, exclude_seen=False).items[0].item_id == first
    assert first not in {i.item_id for i in client.recommend("u3", 5).items}


def test_a_seen_item_upserted_since_the_snapshot_stays_dropped(served):
    """An upsert gives the item a new index position the user's history does not hold."""
    server, client = served
    state = server.state
    user = server.pseudonym("u4")
    seen = sorted(_history_ids(server, "u4"))
    old_pos = state.items.position[seen[0]]
    state.items.upsert([(seen[0], state.items.vector(seen[0]).copy())])
    assert state.items.position[seen[0]] >= len(state.catalog) > old_pos
    state.user_vectors[user] = state.items.vector(seen[0]) * 10
    assert client.recommend("u4", 5, exclude_seen=False).items[0].item_id == seen[0]
    got = {i.item_id for i in client.recommend("u4", 10).items}
    assert len(got) == 10 and not got & set(seen)


def test_an_item_from_a_recent_event_is_dropped_at_the_next_request(served):
    server, client = served
    seen = _history_ids(server, "u5")
    top = next(i.item_id for i in client.recommend("u5", 10).items if i.item_id not in seen)
    reply = client.record([{"user_id": "u5", "item_id": top, "event_type": "click"}])
    assert reply.accepted == 1
    got = [i.item_id for i in client.recommend("u5", 10).items]
    assert len(got) == 10 and top not in got and not set(got) & seen


def test_unknown_user_gets_popular_items_without_explanations_unless_asked(served):
    server, client = served
    plain = client.recommend("nobody", 5)
    assert plain.cold_start and [i.item_id for i in plain.items] == server.state.popular[:5]
    assert all(i.explanation == "" for i in plain.items)
    req = client.rec_pb2.RecommendRequest(user_id="nobody", k=5, want_explanations=True)
    told = client.recommender.Recommend(req, metadata=client.metadata, timeout=5)
    assert all(i.explanation == "popular right now" for i in told.items)


def test_pseudonyms_are_cached_and_an_erasure_clears_them(served):
    server, _ = served
    p = server.pseudonym("someone")
    assert server.pseudonym("someone") == p
    assert server._pseudonym.cache_info().currsize >= 1
    server.forget_user(p)
    assert server._pseudonym.cache_info().currsize == 0
    # a user erased upstream (the refresher's ApplyDeltas remove_users, by pseudonym) too
    server.pseudonym("someone")
    admin = Client(f"127.0.0.1:{server.port}", ADMIN)
    admin.call_admin("ApplyDeltas", admin.admin_pb2.ApplyDeltasRequest(
        remove_users=[p], users_pseudonymized=True))
    admin.close()
    assert server._pseudonym.cache_info().currsize == 0


def test_vectorised_search_positions_match_the_id_search():
    from recmodels.index import ItemIndex

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(500, 16)).astype(np.float32)
    idx = ItemIndex.build([f"i{i}" for i in range(500)], vecs, "flat")
    idx.remove(["i3", "i7"])
    q = rng.normal(size=16)  # float64: converted
    by_pos = idx.search_positions(q, 30)
    assert [(i, s) for _, i, s in by_pos] == idx.search(q, 30)
    assert all(idx.item_ids[p] == i for p, i, _ in by_pos)
    exact = np.argsort(-(vecs @ q.astype(np.float32)))
    assert [p for p, _, _ in by_pos] == [p for p in exact.tolist() if p not in (3, 7)][:30]
