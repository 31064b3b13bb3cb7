"""Deployment tooling: the loopback Spark cluster, the deployed Airflow/MLflow stack, the jars,
spark-submit. Imported by the CLI, the Makefile and the DAGs' Spark operator only."""
