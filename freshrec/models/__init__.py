"""The recommender contract shared by every method (see :mod:`freshrec.models.base`)."""
