-- MLflow keeps its own alembic history: give it its own database beside maskd's.
CREATE DATABASE mlflow OWNER maskd;
