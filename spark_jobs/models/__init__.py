"""Recommenders of the method under the freshrec contract, chosen by short name, imported lazily."""

from __future__ import annotations

import importlib

from freshrec.models.base import Recommender

MODELS = {
    "most_popular": "spark_jobs.models.popularity:MostPopularModel",
    "trending": "spark_jobs.models.popularity:TrendingModel",
    "item_knn": "spark_jobs.models.knn:ItemKNNModel",
    "user_knn": "spark_jobs.models.knn:UserKNNModel",
    "content": "spark_jobs.models.content:ContentModel",
    "pure_svd": "spark_jobs.models.factorization:PureSVDModel",
    "ease": "spark_jobs.models.factorization:EASEModel",
    "hybrid": "spark_jobs.models.hybrid:HybridModel",
    "als": "spark_jobs.models.spark_models:SparkALSModel",
    "als_explicit": "spark_jobs.models.spark_models:SparkALSExplicitModel",
    "spark_item_knn": "spark_jobs.models.spark_models:SparkItemKNNModel",
    "spark_user_knn": "spark_jobs.models.spark_models:SparkUserKNNModel",
}
SPARK_MODELS = {"als", "als_explicit", "spark_item_knn", "spark_user_knn"}


def make_model(name: str, **params) -> Recommender:
    try:
        module, cls = MODELS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None
    return getattr(importlib.import_module(module), cls)(**params)
