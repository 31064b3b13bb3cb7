"""Data in: importers of user files, MovieLens, the synthetic generator and named datasets."""
