"""Storage: Delta tables (one DeltaStore for delta-rs and delta-spark), their specs, object
storage, segment logs, encryption at rest and the Spark session."""
