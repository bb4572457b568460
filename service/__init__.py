"""maskd's job service: the REST API, its settings, the SQL store and the MLflow adapter.

Every process of the service runs offline, and MLflow reads its telemetry switch when it is
first imported: the switch is set here, before any module of the service (or the workers, which
import it) can import MLflow.
"""

import os

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
