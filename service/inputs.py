"""Which local files a job spec may make a worker read: one tenant must not read another's.

Job specs name files on the workers (teacher weights, dataset folders and their subfolders).
Without a policy, a spec could point at another project's student weights under the data
directory, or at any file the service can open. The core lists every path a spec reads
(``maskd_core.validate.input_paths``: roots, then sub-paths such as ``images_dir``), each
resolved with its symbolic links, without opening any; this module decides, before validation
opens anything, so that even the errors of a refused spec reveal nothing about other files.
Messages name the spec field, the value the spec gave and the allowed folders, never where a
path leads nor what a folder holds.
"""

from __future__ import annotations

from pathlib import Path

from maskd_core.errors import SpecError
from maskd_core.spec import JobSpec
from service.config import Settings


def check_input_paths(spec: JobSpec, project: str, settings: Settings) -> None:
    """Raise a ``SpecError`` on the first path the project may not read.

    A path may be read when, with its symbolic links resolved, it lies in
    ``data_dir/inputs/<project>``, or outside ``data_dir`` and (when ``input_roots`` is set)
    inside one of those folders. A sub-path must also stay inside its own root. Roots are
    checked before sub-paths, so nothing is said about a folder the project may not read.
    """
    from maskd_core.validate import input_paths

    data_dir = settings.data_dir.resolve()
    own_inputs = settings.project_inputs_dir(project).resolve()
    roots = [root.resolve() for root in settings.input_roots or []]
    for item in input_paths(spec):
        _check_allowed(item.path, item.field, item.given, data_dir, own_inputs, roots)
        if item.escapes_root:
            raise item.escape_error()


def _check_allowed(
    path: Path, field: str, given: str, data_dir: Path, own_inputs: Path, roots: list[Path]
) -> None:
    if path.is_relative_to(own_inputs):
        return
    if path.is_relative_to(data_dir):
        raise SpecError(
            f"{field} {given!r} leads (following symbolic links) into the service's data "
            f"directory, which holds other jobs' and projects' files; put this project's inputs "
            f"under {own_inputs} or outside {data_dir}",
            field=field,
        )
    if roots and not any(path.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in [*roots, own_inputs])
        raise SpecError(
            f"{field} {given!r} leads (following symbolic links) outside the folders this "
            f"service reads job inputs from ({allowed}); put the file there, or ask the "
            "operator to add its folder to MASKD_INPUT_ROOTS",
            field=field,
        )
