"""MLflow set-up shared by every lane: tracking URI and experiment (with an explicit artifact
location) from settings. Imports mlflow lazily, so importing this module stays cheap."""

from __future__ import annotations

from typing import Any

from freshrec.settings import Settings


def mlflow_for(settings: Settings, experiment: str | None = None) -> Any:
    """Return the ``mlflow`` module pointed at freshrec's tracking store and experiment."""
    import mlflow

    (settings.data_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    name = experiment or settings.mlflow.experiment
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=f"{settings.mlflow_artifact_location}/{name}")
    mlflow.set_experiment(name)
    return mlflow
