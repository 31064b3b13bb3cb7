"""The freshrec.v1 gRPC API: protos and stubs, the client. Lanes reach serving only through it."""
