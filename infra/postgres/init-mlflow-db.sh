#!/bin/sh
# Runs once, when the Postgres volume is first created: the image makes POSTGRES_DB (prefect);
# this adds MLflow's database, owned by the same user.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE "${MLFLOW_DB:-mlflow}" OWNER "$POSTGRES_USER";
SQL
