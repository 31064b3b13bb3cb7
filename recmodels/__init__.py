"""Recommenders of the method under the freshrec contract, chosen by short name, imported lazily."""

from __future__ import annotations

import importlib

from recmodels.base import Recommender

MODELS = {
    "most_popular": "recmodels.popularity:MostPopularModel",
    "trending": "recmodels.popularity:TrendingModel",
    "item_knn": "recmodels.knn:ItemKNNModel",
    "user_knn": "recmodels.knn:UserKNNModel",
    "content": "recmodels.content:ContentModel",
    "pure_svd": "recmodels.factorization:PureSVDModel",
    "ease": "recmodels.factorization:EASEModel",
    "hybrid": "recmodels.hybrid:HybridModel",
    "als": "recmodels.spark_models:SparkALSModel",
    "als_explicit": "recmodels.spark_models:SparkALSExplicitModel",
    "spark_item_knn": "recmodels.spark_models:SparkItemKNNModel",
    "spark_user_knn": "recmodels.spark_models:SparkUserKNNModel",
    "two_tower": "recmodels.deep_retrieval:TwoTowerModel",
    "sasrec": "recmodels.deep_retrieval:SASRecModel",
}
SPARK_MODELS = {"als", "als_explicit", "spark_item_knn", "spark_user_knn"}
DEEP_MODELS = {"two_tower", "sasrec"}  # torch, imported only when asked for


def make_model(name: str, **params) -> Recommender:
    try:
        module, cls = MODELS[name].split(":")
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None
    return getattr(importlib.import_module(module), cls)(**params)
