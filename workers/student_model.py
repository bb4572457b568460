"""The distilled student as an MLflow pyfunc model, logged as "models from code".

The teacher a teacher job trained is logged through this file too: nothing here is particular
to students, since the network is rebuilt from its own document.

MLflow stores this file's *source* with the model and runs it at load time, instead of
unpickling a Python object: loading a registered student therefore executes only code we wrote
and reviewed, never code carried inside an artifact. The network itself is rebuilt by name from
the ``model_spec`` artifact the core wrote beside the weights (``maskd_core.models``) and its
weights are read with ``torch.load(weights_only=True)``, the same path a job's teacher takes.

The model is portable: ``maskd_core``'s source is stored with it (``code_paths``; MLflow puts it
on ``sys.path`` before running this file) and its requirements are torch, torchvision, numpy,
pydantic and mlflow, pinned, never maskd. So it loads, predicts and serves
(``mlflow models serve --env-manager local``) where maskd is not installed; this file therefore
imports nothing of ``service`` or ``workers`` (``.ci/pyfunc-check`` checks it in a fresh venv).

Input: float32 ``[N, 3, H, W]`` images, normalised like the training data. Output: the
network's main output, for segmentation the logits ``[N, K, H, W]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from maskd_core.models import build_from_document


class StudentModel(PythonModel):
    """Rebuilds the student from its document and weights; ``predict`` runs it in eval mode."""

    def load_context(self, context: PythonModelContext) -> None:
        document = json.loads(Path(context.artifacts["model_spec"]).read_text())
        self.network = build_from_document(document, context.artifacts["weights"])

    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> np.ndarray:
        images = torch.from_numpy(np.ascontiguousarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            output = self.network(images)
        if isinstance(output, dict):
            output = output["out"]
        result: np.ndarray = output.numpy()
        return result


mlflow.models.set_model(StudentModel())
