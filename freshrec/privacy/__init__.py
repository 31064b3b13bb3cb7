"""Privacy: pseudonyms, key rotation, erasure and the volume check."""
