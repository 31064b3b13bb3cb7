"""Serving lane: index snapshots, offline recommendation and (later) the gRPC server."""
