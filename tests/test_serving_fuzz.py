"""Hypothesis drives arbitrary request fields at a real server: it must answer every call with OK
or a client error and keep serving."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from freshrec.api.client import Client
from tests.test_serving import CLIENT, _settings

pytestmark = pytest.mark.integration
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}


@pytest.fixture(scope="module")
def client(lane, tmp_path_factory):
    from serving.server import FreshrecServer

    server = FreshrecServer(_settings(lane, tmp_path_factory.mktemp("fuzz"),
                                      rate_limit_per_second=1e6, rate_limit_burst=1_000_000),
                            use_gpu=False)
    port = server.start()
    yield Client(f"127.0.0.1:{port}", CLIENT)
    server.stop(grace=0)


text = st.text(max_size=300)


def _code(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(user=text, k=st.integers(-2**31, 2**31 - 1), cats=st.lists(text, max_size=5),
       excl=st.lists(text, max_size=5), seen=st.one_of(st.none(), st.booleans()),
       ctx=st.dictionaries(text, text, max_size=3))
def test_recommend_never_crashes(client, user, k, cats, excl, seen, ctx):
    kw = {"include_categories": cats, "exclude_items": excl}
    if seen is not None:
        kw["exclude_seen"] = seen
    assert _code(lambda: client.recommend(user, k, context=ctx, **kw)) in ALLOWED


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(item=text, k=st.integers(-5, 500))
def test_similar_never_crashes(client, item, k):
    assert _code(lambda: client.similar(item, k)) in ALLOWED


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(events=st.lists(st.fixed_dictionaries(
    {"user_id": text, "item_id": text, "event_type": st.sampled_from(["view", "buy", "", "rating"]),
     "ts": st.one_of(text, st.just("2026-11-01T00:00:00Z"), st.just("1762000000"))},
    optional={"value": st.floats(allow_nan=True), "event_id": text}), max_size=8))
def test_record_events_never_crashes(client, events):
    assert _code(lambda: client.record(events)) in ALLOWED
    assert client.recommend("still-alive", 1).items


def test_1000_fuzzed_calls_over_every_method_get_clear_codes_and_the_server_stays_up(tmp_path):
    """Random fields, huge strings, garbage bytes and messages of the wrong type, with missing,
    wrong, client and admin tokens, over every method (benchmarks/fuzz.py runs 10,000)."""
    from benchmarks.fuzz import CLEAR, fuzz
    from tests.test_serving_guard import start

    server, addr = start(tmp_path, rate_limit_per_second=1e9, rate_limit_burst=10**9,
                         peer_rate_limit_per_second=1e9, peer_rate_limit_burst=10**9)
    try:
        codes, bad = fuzz(addr, 1000, seed=7)
        assert not bad, bad
        assert sum(codes.values()) == 1000 and set(codes) <= CLEAR
        assert codes["INVALID_ARGUMENT"] > 50 and codes["UNAUTHENTICATED"] > 50 and codes["OK"] > 50
        assert len(Client(addr, CLIENT).recommend("u1", 3).items) == 3
    finally:
        server.stop(grace=0)
