"""MLflow set-up shared by every lane: tracking URI and experiment from settings. With the
embedded SQLite store the experiment gets an explicit artifact location under ``data_dir``; with a
remote tracking server (``http(s)://``, e.g. ``make mlflow-up``) none is pinned, so the server's own
(proxied ``--artifacts-destination``) applies. Imports mlflow lazily, so importing this module stays
cheap."""

from __future__ import annotations

from typing import Any

from freshrec.settings import Settings


def mlflow_for(settings: Settings, experiment: str | None = None) -> Any:
    """Return the ``mlflow`` module pointed at freshrec's tracking store and experiment."""
    import mlflow

    uri = settings.mlflow_tracking_uri
    remote = uri.startswith(("http://", "https://"))
    if not remote:
        (settings.data_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    name = experiment or settings.mlflow.experiment
    if mlflow.get_experiment_by_name(name) is None:
        location = None if remote else f"{settings.mlflow_artifact_location}/{name}"
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)
    return mlflow
