"""Contracts: the literals and rules that two lanes must agree on live here, once.

``events``: the event rules, applied by ``RecordEvents`` (one event at a time) and by the batch
``clean`` job (a batch at a time), so an event the server acknowledges is one the batch keeps, with
the same confidence weight. Layer L0: imports freshrec, numpy, pandas and pyarrow only.
"""
