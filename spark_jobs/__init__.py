"""Batch lane: Spark jobs over the Delta tables (ingest, clean, features, ALS, evaluate)."""
