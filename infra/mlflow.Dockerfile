# MLflow tracking server on Postgres with proxied artifacts (docker-compose.yml service `mlflow`).
# The same MLflow version as the project's clients; psycopg2 for the Postgres backend store.
FROM python:3.11-slim
RUN pip install --no-cache-dir "mlflow==3.17.2" "psycopg2-binary>=2.9"
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
