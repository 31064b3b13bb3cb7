"""The impression record: the fields of a served slate as the server logs it and the nearline
intake reads it, and the reasons a record is dead-lettered."""

from __future__ import annotations

REASONS = ("not_json", "not_decodable", "missing_field", "bad_items", "length_mismatch",
           "bad_score", "bad_propensity", "bad_ts", "duplicate_request_id")


REQUIRED = ("request_id", "user_id", "model_version", "items", "ts")


RECORD_FIELDS = ("request_id", "user_id", "model_version", "arm", "items", "scores",
                 "propensities", "ts", "candidates", "candidate_scores")
