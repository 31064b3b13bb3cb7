"""Recommenders of the method under the freshrec contract, chosen by short name, imported lazily.

The built-in models are listed in :data:`MODELS`. A package adds its own under the entry-point group
``freshrec.models`` (name = ``module:Class``, the class a :class:`recmodels.base.Recommender`), e.g.
in its setup.cfg::

    [options.entry_points]
    freshrec.models =
        my_model = my_package.models:MyModel

and a notebook or script can call :func:`register_model`. Parameters come from the settings'
``models.<name>`` section (:func:`model_params`).
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any

from recmodels.base import Recommender

ENTRY_POINT_GROUP = "freshrec.models"

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


_REGISTERED: dict[str, type[Recommender]] = {}


def register_model(name: str, cls: type[Recommender]) -> None:
    """Make ``cls`` (a :class:`Recommender` subclass) available as ``name`` in this process."""
    if not (isinstance(cls, type) and issubclass(cls, Recommender)):
        raise TypeError(f"model {name!r}: {cls!r} is not a recmodels.base.Recommender subclass")
    if name in MODELS and MODELS[name] != f"{cls.__module__}:{cls.__qualname__}":
        raise ValueError(f"model name {name!r} is taken by the built-in {MODELS[name]}; pick another")
    _REGISTERED[name] = cls


def _plugins() -> dict[str, str]:
    """Models other packages declare under the ``freshrec.models`` entry-point group."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_models() -> dict[str, str]:
    """Every model name this process can make: built-ins, entry points, :func:`register_model`."""
    out = dict(MODELS)
    for name, target in _plugins().items():
        out.setdefault(name, target)
    for name, cls in _REGISTERED.items():
        out[name] = f"{cls.__module__}:{cls.__qualname__}"
    return out


def model_class(name: str) -> type[Recommender]:
    if name in _REGISTERED:
        return _REGISTERED[name]
    known = available_models()
    if name not in known:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(known)} (a package adds "
                         f"one under the entry-point group {ENTRY_POINT_GROUP!r})")
    module, _, attr = known[name].partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"model {name!r}: cannot load {known[name]} ({e})") from e
    if not (isinstance(obj, type) and issubclass(obj, Recommender)):
        raise ValueError(f"model {name!r}: {known[name]} is not a recmodels.base.Recommender subclass")
    return obj


def make_model(name: str, **params) -> Recommender:
    cls = model_class(name)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(params) - set(accepted) - {"self"})
        if unknown:
            raise ValueError(f"model {name!r} has no parameter(s) {unknown} (check models.{name} in "
                             f"the settings); it takes {sorted(set(accepted) - {'self'})}")
    return cls(**params)


def model_params(name: str, settings: Any) -> dict:
    """Parameters of model ``name`` from the settings: ``models.<name>`` laid over the ``als``
    section for the Spark ALS models (which the fold-in shares); the model's defaults for the rest."""
    own = dict((getattr(settings, "models", None) or {}).get(name, {}))
    if name == "als":
        return {**settings.als.model_dump(), **own}
    if name == "als_explicit":
        als = settings.als.model_dump()
        return {**{k: als[k] for k in ("iterations", "reg_param", "num_blocks", "seed")}, **own}
    if name == "hybrid" and "source_params" not in own:
        # the hybrid's sources take their own models.<source> parameters (its EASE source has
        # the hybrid's ease_max_items / ease_top_items)
        from recmodels.hybrid import DEFAULT_SOURCES

        sources = own.get("sources", DEFAULT_SOURCES)
        nested = {s: model_params(s, settings) for s in sources if s not in ("ease", "hybrid")}
        own["source_params"] = {s: p for s, p in nested.items() if p}
    return own
