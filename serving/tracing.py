"""OpenTelemetry tracing of the gRPC server (``serving.tracing``): the interceptor that opens one
span per call. Reads the standard OTEL_EXPORTER_OTLP_* variables (through the OTLP exporter) when
the process has set no tracer provider; writes nothing locally (spans go to the exporter)."""

from __future__ import annotations

from freshrec.settings import Settings, SettingsError


def tracing_interceptors(settings: Settings) -> list:
    """With ``serving.tracing``: OpenTelemetry's gRPC server interceptor (one span per call,
    joined to the caller's trace through its metadata), exporting to the tracer provider the
    process has set, else to a new SDK provider with the OTLP exporter (configured by the standard
    OTEL_EXPORTER_OTLP_* variables). SettingsError names the package to install when it is
    missing."""
    if not settings.serving.tracing:
        return []
    try:
        from opentelemetry import trace
        from opentelemetry.instrumentation.grpc import server_interceptor
    except ImportError as e:
        raise SettingsError(
            "serving.tracing is on but opentelemetry-instrumentation-grpc is not installed "
            f"({e}): pip install 'freshrec[tracing]' (or "
            "opentelemetry-instrumentation-grpc==0.66b2), or set serving.tracing: false") from None
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider):  # the process configured none
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as e:
            raise SettingsError(
                "serving.tracing is on and no tracer provider is set, but opentelemetry-sdk or "
                f"opentelemetry-exporter-otlp-proto-grpc is missing ({e}): pip install "
                "'freshrec[tracing]'") from None
        provider = TracerProvider(resource=Resource.create({"service.name": "freshrec-serving"}))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        trace.set_tracer_provider(provider)
    return [server_interceptor(tracer_provider=provider)]
