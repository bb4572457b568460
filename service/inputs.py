"""Which local files a job spec may make a worker read: one tenant must not read another's.

Job specs name files on the workers (teacher weights, dataset folders). Without a policy, a
spec could point at another project's student weights under the data directory, or at any file
the service can open. The core lists the paths a spec reads (``maskd_core.validate.input_paths``)
without opening them; this module decides, before validation opens anything, so that even the
errors of a refused spec reveal nothing about other files.
"""

from __future__ import annotations

from pathlib import Path

from maskd_core.errors import SpecError
from maskd_core.spec import JobSpec
from service.config import Settings


def check_input_paths(spec: JobSpec, project: str, settings: Settings) -> None:
    """Raise a ``SpecError`` on the first path the project may not read."""
    from maskd_core.validate import input_paths

    data_dir = settings.data_dir.resolve()
    own_inputs = settings.project_inputs_dir(project).resolve()
    roots = [root.resolve() for root in settings.input_roots or []]
    for field, raw in input_paths(spec).items():
        path = Path(raw).resolve()
        if path.is_relative_to(data_dir):
            if path.is_relative_to(own_inputs):
                continue
            raise SpecError(
                f"{raw!r} is inside the service's data directory, which holds other jobs' "
                f"files; put this project's inputs under {own_inputs} or outside {data_dir}",
                field=field,
            )
        if roots and not any(path.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(root) for root in roots)
            raise SpecError(
                f"{raw!r} is outside the folders this service reads job inputs from ({allowed}); "
                "put the file there, or ask the operator to add its folder to MASKD_INPUT_ROOTS",
                field=field,
            )
