"""The freshrec command; the one corner of freshrec/ that may import lanes (lazily)."""
