"""Standard observability of the real server on loopback: the gRPC-standard metric series on
/metrics (every call counted with its status code, timed), prometheus_client's default process and
Python collectors, and OpenTelemetry tracing through the grpc instrumentation (off by default)."""

from __future__ import annotations

import sys
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from freshrec.settings import SettingsError
from freshrec.api.client import Client
from tests.test_serving_guard import CLIENT, start

RECOMMEND = {"grpc_type": "unary", "grpc_service": "freshrec.v1.Recommender",
             "grpc_method": "Recommend"}


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_every_call_is_counted_with_its_code_under_the_standard_names(tmp_path):
    server, addr = start(tmp_path, metrics_port=0)
    try:
        client, anonymous = Client(addr, CLIENT), Client(addr)
        for u in range(7):
            client.recommend(f"u{u}", 5)
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as e:
                client.recommend("u1", 0)  # k out of range
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as e:
                anonymous.recommend("u1", 5)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        got = _scrape(server.metrics_port)
        handled = "grpc_server_handled_total"
        assert _value(got, handled, **RECOMMEND, grpc_code="OK") == 7
        assert _value(got, handled, **RECOMMEND, grpc_code="INVALID_ARGUMENT") == 3
        assert _value(got, handled, **RECOMMEND, grpc_code="UNAUTHENTICATED") == 2
        assert _value(got, "grpc_server_started_total", **RECOMMEND) == 12
        # timed: the calls that reached the servicer (refused ones end before it)
        assert _value(got, "grpc_server_handling_seconds_count", **RECOMMEND) == 10
        assert _value(got, "grpc_server_handling_seconds_bucket", **RECOMMEND, le="+Inf") == 10
        # the default collectors: this process's CPU and memory, the Python runtime
        assert _value(got, "process_cpu_seconds_total") > 0
        assert _value(got, "process_resident_memory_bytes") > 0
        assert any(name == "python_info" for name, _ in got)
        assert any(name == "python_gc_collections_total" for name, _ in got)
        client.close()
        anonymous.close()
    finally:
        server.stop(grace=0)


def test_tracing_is_off_by_default_and_needs_its_package(tmp_path, monkeypatch):
    from freshrec.settings import load_settings
    from serving.server import tracing_interceptors

    assert load_settings("local", env={}).serving.tracing is False
    monkeypatch.setitem(sys.modules, "opentelemetry.instrumentation.grpc", None)  # not installed
    with pytest.raises(SettingsError, match="opentelemetry-instrumentation-grpc"):
        start(tmp_path, tracing=True)
    assert tracing_interceptors(load_settings("local", env={})) == []


def test_tracing_on_gives_one_span_per_call_with_its_status(tmp_path):
    pytest.importorskip("opentelemetry.instrumentation.grpc",
                        reason="the tracing extra (opentelemetry-instrumentation-grpc) is not "
                               "installed")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    spans = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    server, addr = start(tmp_path, tracing=True)
    try:
        client = Client(addr, CLIENT)
        client.recommend("u1", 5)
        with pytest.raises(grpc.RpcError):
            client.recommend("u1", 0)
        client.close()
    finally:
        server.stop(grace=0)
    got = [s for s in spans.get_finished_spans()
           if s.name == "/freshrec.v1.Recommender/Recommend"]
    assert len(got) == 2
    codes = sorted(s.attributes.get("rpc.grpc.status_code") for s in got)
    assert codes == [grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]]
