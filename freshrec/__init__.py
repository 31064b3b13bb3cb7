"""freshrec: the shared bottom layer (settings, tables, Delta I/O, metrics, contracts)."""
