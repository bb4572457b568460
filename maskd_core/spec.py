"""The job spec: the one contract between the API, the workers and the core library.

It is plain pydantic and imports no torch, so the API can parse and store it cheaply. Structure
and value ranges are checked here; everything that needs the registries or a model (names of
architectures, datasets and layers, channel counts) is checked by ``maskd_core.validate``
before a job is queued.

Defaults follow the MasKD paper and its official configs (see docs/method.md). Where the
segmentation and detection recipes differ, the default is chosen by ``task`` when the field is
left out: tokens (8 vs 6), the mask-weighting branch (off vs on), the custom student mask (off vs
on) and the optimisers. MasKD's ``loss_weight`` left out follows the student's detector family,
which only the model registry knows, so it stays None here and ``maskd_core.methods`` resolves it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from itertools import islice
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    JsonValue,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, InitErrorDetails, PydanticCustomError

TaskName = Literal["segmentation", "detection"]
JobKind = Literal["distill", "teacher"]

INT64_MAX = 2**63 - 1
"""The largest integer a spec may hold anywhere: what PostgreSQL's BIGINT, a torch seed and
every step counter can represent. No job needs more, and no system downstream can store it."""

NAME_LENGTH = 128
"""The longest registry name (architecture, dataset, method) a spec may give."""

LAYER_NAME_LENGTH = 512
"""The longest layer name: a dotted module path (``backbone.body.layer4.2.conv3``)."""

INT64_MESSAGE = (
    "must lie between -(2**63 - 1) and 2**63 - 1, the largest integers a job's database and "
    "processes hold"
)

MAX_NESTING = 64
"""How deeply a spec may nest, free-form ``args``/``params`` included (the typed part uses six
levels). A structural bound: deeper data only exhausts recursion in the parsers downstream; the
API refuses much less deep bodies already (``MASKD_MAX_JSON_DEPTH``)."""


class StrictModel(BaseModel):
    """Refuses unknown fields, so a typo in a spec is an error rather than a silent default.

    Every value, down to the free-form ``args`` and ``params``, must also be plain data that
    every store and process downstream can hold: finite numbers, integers within ±``INT64_MAX``,
    strings without NUL characters or unpaired surrogates, and nesting within ``MAX_NESTING``.
    ``_plain_data`` walks the raw input once and names each offending field.

    The JSON schema comes in two modes, and generated clients build their types from it. The
    request schema (validation mode) leaves out of ``required`` what a validator fills in
    (``_filled_in``), since the shipped specs omit those fields; the response schema
    (serialization mode) requires every field, since a stored spec spells each one out. The
    two differ, so each gets its own title (``JobSpec`` and ``JobSpecOut``): generators name
    classes by title, and two schemas titled alike become one class that fits neither.
    """

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
        json_schema_serialization_defaults_required=True,
    )

    @classmethod
    def _filled_in(cls) -> frozenset[str]:
        """Fields without a default of their own that a ``before`` validator fills in."""
        return frozenset()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(core_schema)
        definition = handler.resolve_ref_schema(json_schema)
        if handler.mode == "serialization":
            definition["title"] = f"{cls.__name__}Out"
            return json_schema
        filled = cls._filled_in()
        required = [name for name in definition.get("required", []) if name not in filled]
        if required:
            definition["required"] = required
        else:
            definition.pop("required", None)
        return json_schema

    @model_validator(mode="before")
    @classmethod
    def _plain_data(cls, data: Any) -> Any:
        if isinstance(data, dict):
            problems = list(islice(_impossible_values(data, ()), 20))  # the first 20 say enough
            if problems:
                raise ValidationError.from_exception_data(cls.__name__, problems)
        return data


def _impossible_values(
    value: Any, loc: tuple[str | int, ...], depth: int = 0
) -> Iterator[InitErrorDetails]:
    """Every value under ``value`` that no store or process downstream could hold, by location."""
    if depth > MAX_NESTING:
        yield _problem(
            "nesting_too_deep",
            f"nested more than {MAX_NESTING} levels deep; flatten this value",
            loc,
            "…",
        )
    elif isinstance(value, str):
        yield from _string_problems(value, loc)
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not -INT64_MAX <= value <= INT64_MAX:
            yield _problem("int64_range", INT64_MESSAGE, loc, value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            yield _problem(
                "finite_number", "Input should be a finite number (not inf or nan)", loc, value
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            where = (*loc, _printable_key(key))
            if isinstance(key, str):
                yield from _string_problems(key, where, what="key")
            yield from _impossible_values(item, where, depth + 1)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _impossible_values(item, (*loc, index), depth + 1)


def _string_problems(
    text: str, loc: tuple[str | int, ...], what: str = "string"
) -> Iterator[InitErrorDetails]:
    if "\x00" in text:
        yield _problem(
            "nul_character",
            f"this {what} contains a NUL character (\\x00), which no file name, database or "
            "log line can hold; remove it",
            loc,
            text,
        )
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        yield _problem(
            "string_unicode",
            f"this {what} contains an unpaired UTF-16 surrogate, which is not valid Unicode; "
            "send valid UTF-8 text",
            loc,
            repr(text),
        )


def _printable_key(key: Any) -> str | int:
    """``key`` as a location part every client can print: escaped unless it is plain text."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key
    if isinstance(key, str) and key.isprintable():
        return key
    return ascii(key)


def _problem(kind: str, message: str, loc: tuple[str | int, ...], value: Any) -> InitErrorDetails:
    # The message template holds no braces of its own: the text is passed as its one field.
    return InitErrorDetails(
        type=PydanticCustomError(kind, "{reason}", {"reason": message}), loc=loc, input=value
    )


class ModelSpec(StrictModel):
    """A network built by name from the model registry, with optional weights."""

    arch: str = Field(
        max_length=NAME_LENGTH, description="Name in the model registry, e.g. 'seg_tiny_teacher'."
    )
    args: dict[str, JsonValue] = Field(
        default_factory=dict, description="Arguments of the architecture (see its registry entry)."
    )
    weights: str | None = Field(
        default=None,
        description="A local state-dict file (loaded with weights_only=True), or none for "
        "random initialisation.",
    )
    layers: (
        Annotated[list[Annotated[str, Field(max_length=LAYER_NAME_LENGTH)]], Field(min_length=1)]
        | None
    ) = Field(
        default=None,
        description="Module names whose outputs are distilled, paired by position between "
        "teacher and student. A module returning a tuple or dict (FPN) yields one level per "
        "tensor. Left out: the architecture's default taps (a detector's FPN levels, a "
        "segmentation model's logits); the pairing chosen is reported in the job's outputs.",
    )

    @property
    def tapped_layers(self) -> list[str]:
        """``layers`` once resolved (``maskd_core.models.with_default_layers`` fills in the
        registry's defaults before anything taps); the registry is not visible here."""
        if self.layers is None:
            raise ValueError(f"the layers of {self.arch!r} are not resolved yet")
        return self.layers


class DataSourceSpec(StrictModel):
    """A dataset by name in the dataset registry, with that entry's arguments.

    The base of every dataset a job reads, so that whatever walks a spec for its datasets
    (``maskd_core.validate.input_paths`` polices their paths) finds each one by its type.
    """

    name: str = Field(max_length=NAME_LENGTH, description="Name in the dataset registry.")
    args: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="Arguments of the dataset (see its registry entry): paths, classes, split.",
    )


class DatasetSpec(DataSourceSpec):
    """The training data, and where the validation data comes from when no ``val_dataset``
    is given: a random ``val_fraction`` of it."""

    name: str = Field(
        default="procedural_shapes",
        max_length=NAME_LENGTH,
        description="Name in the dataset registry for the task.",
    )
    val_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Used only without val_dataset: this fraction of the dataset's samples, "
        "drawn at random by seed, is held out for validation and the rest trains. Samples that "
        "overlap (tiles of one image, frames of one video) then land on both sides; give the "
        "dataset's own validation split as val_dataset instead.",
    )
    augment: bool = Field(
        default=True,
        description="Augment training samples (the dataset's flips, scales and crops); "
        "validation samples never are.",
    )


SPLIT_ONLY_FIELDS = ("val_fraction", "augment")
"""``DatasetSpec`` fields about training on the dataset, which a validation dataset has not."""


class ValDatasetSpec(DataSourceSpec):
    """A dataset used whole, without augmentation, to validate: the dataset's own validation
    split (COCO's ``instances_val2017.json``, VOC's ``ImageSets/Main/val.txt``, an image
    folder's ``val/``). It must hold the training dataset's task and classes."""

    @classmethod
    def _filled_in(cls) -> frozenset[str]:
        return frozenset({"name"})  # JobSpec._val_dataset_name: the training dataset's

    @model_validator(mode="before")
    @classmethod
    def _no_split_settings(cls, data: Any) -> Any:
        given = [key for key in SPLIT_ONLY_FIELDS if isinstance(data, dict) and key in data]
        if given:
            raise ValueError(
                f"{' and '.join(given)} belong to dataset, not val_dataset: a validation "
                "dataset is used whole and never augmented; remove them here"
            )
        return data


class OptimizerSpec(StrictModel):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    schedule: Literal["constant", "cosine", "poly", "step"] = "constant"
    warmup_steps: int = Field(default=0, ge=0)
    min_lr: float = Field(default=0.0, ge=0.0)
    poly_power: float = Field(default=0.9, gt=0.0)
    step_milestones: list[float] = Field(
        default_factory=lambda: [2 / 3, 11 / 12],
        description="For 'step': fractions of the iterations at which lr is multiplied by 0.1 "
        "(the detection 2x schedule decays at epochs 16 and 22 of 24).",
    )
    grad_clip: float | None = Field(default=None, gt=0.0)


REGISTRY_SCHEME = "models:/"


def _registry_uri(uri: str) -> str:
    """A ``models:/`` URI: the service resolves it in the project's registry (the core never
    talks to MLflow), so a local path here would be silently ignored."""
    if not uri.startswith(REGISTRY_SCHEME):
        raise PydanticCustomError(
            "registry_uri",
            "{reason}",
            {
                "reason": f"{uri!r} is not a registered model; write "
                "models:/<project>.<teacher arch>-tokens@ALIAS or .../VERSION"
            },
        )
    return uri


class Stage1Spec(StrictModel):
    """Learning receptive tokens on the frozen teacher."""

    tokens: int = Field(gt=0, le=64, description="Receptive tokens per tapped level (T).")
    iterations: int = Field(default=2000, gt=0)
    optimizer: OptimizerSpec
    dice_weight: float = Field(default=1.0, ge=0.0)
    mask_weighting: bool = Field(
        description="Learn the per-image softmax over tokens (the paper's detection configs)."
    )
    reuse: bool = Field(
        default=True, description="Reuse tokens already learned for the same teacher and data."
    )

    from_model: Annotated[str, AfterValidator(_registry_uri)] | None = Field(
        default=None,
        max_length=LAYER_NAME_LENGTH,
        description="Registered tokens to distil with instead of learning them: "
        "'models:/<project>.<teacher arch>-tokens@ALIAS' or '.../VERSION' (GET /v1/models "
        "lists them). Stage 1 then does not run. The version must have been learned on this "
        "teacher (arch and weights) and teacher.layers, with these tokens and mask_weighting.",
    )

    @classmethod
    def _filled_in(cls) -> frozenset[str]:
        return _filled_by_every_task("stage1")


class MethodSpec(StrictModel):
    """The stage-2 distillation method, by name in ``maskd_core.methods.METHODS``.

    ``params`` are checked against the method's own argument model by ``maskd_core.validate``
    (the registry needs torch; this module does not). A bare string is accepted as the name.
    """

    name: str = Field(
        default="maskd",
        max_length=NAME_LENGTH,
        description="'maskd' (default), 'none', 'fitnet', 'mgd', 'amd', 'dfmsd', 'samkd' or "
        "'pcd'; see docs/methods.md.",
    )
    params: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="The method's hyperparameters; loss scales differ by orders of magnitude "
        "between methods, so never carry a weight from one method to another.",
    )

    @model_validator(mode="before")
    @classmethod
    def _name_alone(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class _NameAccepted:
    """Says in the request schema that a method may be given by its name alone (``"mgd"``,
    which ``MethodSpec._name_alone`` reads as ``{name: mgd}``), as the shipped specs do; a
    client generated from a schema without it refuses them. Stored specs hold the object."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        json_schema = handler(core_schema)
        if handler.mode != "validation":
            return json_schema
        name = {
            "type": "string",
            "maxLength": NAME_LENGTH,
            "description": "The method's name alone: the method with its default params.",
        }
        return {"anyOf": [json_schema, name]}


MethodChoice = Annotated[MethodSpec, _NameAccepted()]


class HeadRegressionSpec(StrictModel):
    """Head-level regression KD: weight · Σ_levels mean loss(student − teacher) over the box
    regression head's raw outputs (one [N, A·4, H, W] map per FPN level), beside the method."""

    weight: float = Field(default=1.0, gt=0.0, description="Multiplies the sum over levels.")
    loss: Literal["l1", "smooth_l1", "mse"] = Field(
        default="l1",
        description="Elementwise loss: 'l1' (official RetinaNet-R101 config), 'smooth_l1' "
        "(RetinaNet-X101 config, beta 1), 'mse'.",
    )
    beta: float = Field(
        default=1.0, gt=0.0, description="smooth_l1 only: where it turns from quadratic to linear."
    )


class Stage2Spec(StrictModel):
    """Distilling the student into the teacher's features with ``method`` (MasKD by default).

    The method's own settings live in ``method.params``. MasKD's (``loss_weight``,
    ``custom_mask``, ``custom_mask_warmup``, ``mask_eps``) were once fields of this section; they
    are still accepted here and moved into the MasKD method's params (``JobSpec``'s validator).
    """

    iterations: int = Field(default=40000, gt=0)
    optimizer: OptimizerSpec
    align: Literal["conv1x1", "identity"] = Field(
        default="conv1x1",
        description="Student→teacher adaptation per level; 'identity' needs equal channels.",
    )
    method: MethodChoice = Field(default_factory=MethodSpec)
    inherit_teacher_weights: bool = Field(
        default=False,
        description="Detection: before stage 2, copy into the student every tensor of the "
        "teacher's neck (FPN) and head whose name and shape match the student's (the official "
        "RetinaNet recipe; backbones differ and are never copied). Both models must be of one "
        "detector family; the count copied is in the run's summary.json. Every method of a "
        "comparison starts from it.",
    )
    head_regression: HeadRegressionSpec | None = Field(
        default=None,
        description="Detection, one-stage (RetinaNet, FCOS): also distil the box-regression "
        "head's outputs, level by level (the official RetinaNet recipe: l1, weight 1). none: off.",
    )

    @classmethod
    def _filled_in(cls) -> frozenset[str]:
        return _filled_by_every_task("stage2")


class TeacherTrainingSpec(StrictModel):
    """The recipe a teacher is trained with from scratch (a teacher job, ``maskd
    train-teacher``): supervised on the task loss alone, so it has none of stage 2's
    distillation settings, and its step budget is its own."""

    iterations: int = Field(gt=0, description="Training steps.")
    optimizer: OptimizerSpec


MAX_WORLD_SIZE = 64
"""The most processes one job may train with: eight hosts' worth of eight GPUs, far more than
one worker host offers (a job runs on one host's GPUs; ``MASKD_MAX_JOB_GPUS`` caps it)."""


class ResourcesSpec(StrictModel):
    """How many processes one job trains with: torch.distributed data parallelism, one process
    per GPU (NCCL), or CPU processes (gloo) for CPU hosts and tests. Left out: one process.

    The global batch stays ``batch_size``: each of the N processes takes ``batch_size / N`` of
    every step's samples, so the step, its loss and a checkpoint mean the same at any N, and a
    job checkpointed at N processes resumes at M."""

    gpus: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WORLD_SIZE,
        description="GPUs, one training process each (NCCL). The job goes to a worker queue "
        "that offers this many GPUs on one host.",
    )
    processes: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WORLD_SIZE,
        description="CPU training processes (gloo), for hosts without GPUs and for tests; "
        "needs device cpu or auto on a CPU worker.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> ResourcesSpec:
        if self.gpus is not None and self.processes is not None:
            raise ValueError(
                "resources sets both gpus and processes; give gpus for GPU processes (NCCL) "
                "or processes for CPU processes (gloo), not both"
            )
        return self

    @property
    def world_size(self) -> int:
        """The number of training processes."""
        return self.gpus or self.processes or 1


class ComparisonSpec(StrictModel):
    """Several stage-2 methods side by side on one teacher, one data split and one step budget.

    Every (method, seed) pair trains its own student for ``stage2.iterations`` steps; the seed
    drives the student's initialisation and batch order, while the dataset and its split stay
    those of the job's ``seed`` so every run sees the same data. Method names are unique: a run
    is named by its method and seed (``runs/<method>-seed<seed>``), and two configurations of
    one method belong in two jobs, where they cannot be confused in the table.
    """

    methods: list[MethodChoice] = Field(
        min_length=1, description="The methods to compare, e.g. [maskd, none, fitnet]."
    )
    seeds: list[Annotated[int, Field(ge=0, le=INT64_MAX)]] = Field(
        min_length=1, description="Student seeds, e.g. [0, 1, 2]; each method runs once per seed."
    )

    @model_validator(mode="after")
    def _distinct(self) -> ComparisonSpec:
        names = [method.name for method in self.methods]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(
                f"comparison.methods lists {', '.join(twice)} more than once; list each method "
                "once (compare two settings of one method in two jobs)"
            )
        if len(set(self.seeds)) != len(self.seeds) or any(seed < 0 for seed in self.seeds):
            raise ValueError("comparison.seeds must be distinct non-negative integers")
        return self


MAX_LABELS = 32
"""The most labels one job may carry: enough to describe it, few enough to index and to copy
onto every MLflow run of the job."""
LABEL_KEY_LENGTH = 63
LABEL_VALUE_LENGTH = 128
LABEL_KEY_PATTERN = r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?"
"""Letters, digits, ``.``, ``_`` and ``-``, starting and ending with a letter or digit: no
``=`` or ``,``, so ``?label=key=value`` splits at its first ``=``, and every key is a valid
MLflow tag name."""
LABEL_VALUE_PATTERN = r"[A-Za-z0-9._:/@+-]+"
"""Letters, digits and ``. _ : / @ + -``: safe in a query string, a SQL index and an MLflow tag."""


def check_label_key(key: str) -> str:
    return _check_label_part(
        key,
        "key",
        LABEL_KEY_LENGTH,
        LABEL_KEY_PATTERN,
        "letters, digits, '.', '_' or '-', starting and ending with a letter or digit "
        "(e.g. 'team' or 'data.version')",
    )


def check_label_value(value: str) -> str:
    return _check_label_part(
        value,
        "value",
        LABEL_VALUE_LENGTH,
        LABEL_VALUE_PATTERN,
        "letters, digits or '.', '_', ':', '/', '@', '+', '-' (no spaces; e.g. "
        "'vision-team' or 'v2.1')",
    )


def _check_label_part(text: str, part: str, max_length: int, pattern: str, allowed: str) -> str:
    """``text`` when it is a valid label ``part`` (key or value); else the error that says
    which characters (``allowed``) and how many it may have."""
    if len(text) > max_length or not re.fullmatch(pattern, text):
        raise PydanticCustomError(
            f"label_{part}",
            "{reason}",
            {"reason": f"label {part} {text!r} is not valid: use 1 to {max_length} {allowed}"},
        )
    return text


LabelKey = Annotated[
    str,
    AfterValidator(check_label_key),
    WithJsonSchema(
        {"type": "string", "pattern": f"^{LABEL_KEY_PATTERN}$", "maxLength": LABEL_KEY_LENGTH}
    ),
]
LabelValue = Annotated[
    str,
    AfterValidator(check_label_value),
    WithJsonSchema(
        {"type": "string", "pattern": f"^{LABEL_VALUE_PATTERN}$", "maxLength": LABEL_VALUE_LENGTH}
    ),
]


ExportFormat = Literal["onnx", "torch_export"]


class ExportSpec(StrictModel):
    """The deployable copies of each distilled student (``maskd_core.export``): exported after
    training, checked against the PyTorch student on validation batches, and published beside
    it. A copy whose outputs or metric drift past the tolerances is refused, not published; the
    job still succeeds with its PyTorch student and says why the copy was refused."""

    formats: list[ExportFormat] = Field(
        default_factory=lambda: list[ExportFormat](["onnx"]),
        max_length=2,
        description="'onnx' (checked with onnxruntime) and/or 'torch_export' (a torch.export "
        ".pt2 program); [] exports nothing.",
    )
    tolerance: float = Field(
        default=1e-3,
        ge=0.0,
        description="Largest absolute difference allowed between the exported and the PyTorch "
        "student's outputs on the validation batches.",
    )
    metric_tolerance: float = Field(
        default=0.005,
        ge=0.0,
        description="Largest absolute change of the task's primary metric (miou, map) allowed "
        "between the exported and the PyTorch student on the same batches.",
    )
    batches: int = Field(
        default=4, gt=0, le=1000, description="Validation batches the parity check runs on."
    )
    latency_runs: int = Field(
        default=20,
        gt=0,
        le=1000,
        description="Timed batch-1 runs (after warm-up) whose median is each model's latency.",
    )

    @field_validator("formats")
    @classmethod
    def _distinct(cls, formats: list[ExportFormat]) -> list[ExportFormat]:
        if len(set(formats)) != len(formats):
            raise ValueError(f"formats {formats} names a format twice; list each once")
        return formats


class JobSpec(StrictModel):
    """Everything a MasKD job needs, from models and data to both stages' settings.

    With ``comparison`` the job trains one student per (method, seed) listed there instead of
    one with ``stage2.method``; see ``run_spec``. With ``kind: teacher`` it trains the teacher
    alone, with ``teacher_training``, and has no student (``_fields_of_kind``); ``stage1`` and
    ``stage2`` are filled in as in every spec and not used.
    """

    name: str = Field(default="maskd-job", min_length=1, max_length=128)
    kind: JobKind = Field(
        default="distill",
        description="'distill' (default): distil student from teacher. 'teacher': train "
        "teacher.arch on dataset with teacher_training (from teacher.weights when given, "
        "else from scratch) and register it as models:/<project>.<teacher arch>-teacher; "
        "student and comparison are refused, stage1 and stage2 are not used.",
    )
    task: TaskName = "segmentation"
    teacher: ModelSpec
    student: ModelSpec | None = Field(
        default=None,
        description="The network distilled: required for kind 'distill', refused for kind "
        "'teacher'.",
    )
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    val_dataset: ValDatasetSpec | None = Field(
        default=None,
        description="The data to validate on, used whole: the dataset's own validation split, "
        "e.g. {args: {annotations: .../instances_val2017.json, images: .../val2017}} for "
        "COCO, {args: {root: ..., split: val}} for VOC. name defaults to dataset.name; the "
        "task and classes must be the training dataset's. Without it, dataset.val_fraction of "
        "the training dataset is held out at random.",
    )
    stage1: Stage1Spec
    stage2: Stage2Spec
    seed: int = Field(default=0, ge=0, le=INT64_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=8, gt=0)
    num_workers: int = Field(default=0, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every: int = Field(default=0, ge=0, description="Evaluate every N steps (0: at the end).")
    checkpoint_every: int = Field(default=200, gt=0)
    max_eval_batches: int | None = Field(default=None, gt=0)
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="Processes the job trains with, e.g. {gpus: 4} or {processes: 2}; the "
        "default is one. batch_size is the global batch and must divide by their number.",
    )
    comparison: ComparisonSpec | None = Field(
        default=None,
        description="Compare stage-2 methods over seeds in one job (stage2.method is then "
        "not used); see docs/methods.md.",
    )
    export: ExportSpec = Field(
        default_factory=ExportSpec,
        description="Deployable copies of the student (ONNX by default), checked for parity "
        "with it; see docs/tracking.md.",
    )
    teacher_training: TeacherTrainingSpec | None = Field(
        default=None,
        description="How the teacher is trained: required for kind 'teacher'; `maskd "
        "train-teacher` uses it too, and without it falls back to stage2.optimizer.",
    )
    labels: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=MAX_LABELS,
        description=f"Key/value labels (at most {MAX_LABELS}) to find the job by: "
        "GET /v1/jobs?label=team=vision filters on them, and every MLflow run of the job "
        "carries them as tags 'maskd.label.<key>'. They change nothing in training.",
    )

    def methods(self) -> list[MethodSpec]:
        """The stage-2 methods this job runs: the comparison's, ``stage2.method`` alone, or
        none for a teacher job (which therefore learns no tokens either)."""
        if self.kind == "teacher":
            return []
        return list(self.comparison.methods) if self.comparison else [self.stage2.method]

    @property
    def distilled_student(self) -> ModelSpec:
        """The student of a distillation job; ``_fields_of_kind`` guarantees one there, and a
        teacher job never reaches the code that distils."""
        if self.student is None:
            raise ValueError(f"job {self.name!r} is a {self.kind} job and has no student")
        return self.student

    @classmethod
    def _filled_in(cls) -> frozenset[str]:
        return frozenset({"stage1", "stage2"})  # _fill_task_defaults: the task's sections

    def run_spec(self, method: MethodSpec, seed: int) -> JobSpec:
        """The single-method job one comparison run amounts to."""
        stage2 = self.stage2.model_copy(update={"method": method})
        return self.model_copy(update={"stage2": stage2, "seed": seed, "comparison": None})

    @model_validator(mode="before")
    @classmethod
    def _val_dataset_name(cls, data: Any) -> Any:
        """A validation dataset without a name is read the way the training dataset is: the
        common case is the same format with other files (a split, a folder)."""
        if not isinstance(data, dict) or not isinstance(data.get("val_dataset"), dict):
            return data
        val = data["val_dataset"]
        if "name" in val:
            return data
        dataset = data.get("dataset")
        name = dataset.get("name") if isinstance(dataset, dict) else getattr(dataset, "name", None)
        default = DatasetSpec.model_fields["name"].default
        return {**data, "val_dataset": {**val, "name": default if name is None else name}}

    @model_validator(mode="before")
    @classmethod
    def _fill_task_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        task = data.get("task", "segmentation")
        defaults = TASK_DEFAULTS.get(task) if isinstance(task, str) else None
        if defaults is None:
            return data  # the Literal check reports the bad task name (or a task that is no str)
        filled = dict(data)
        for stage in ("stage1", "stage2"):
            given = filled.get(stage, {})
            if isinstance(given, dict):
                filled[stage] = {**defaults[stage], **given}
        return _move_maskd_settings(filled, defaults[MASKD])

    @model_validator(mode="after")
    def _fields_of_kind(self) -> JobSpec:
        """Each kind's own fields, each refusal naming its field and the fix."""
        problems: list[InitErrorDetails] = []
        if self.kind == "distill" and self.student is None:
            problems.append(
                _problem(
                    "missing_student",
                    "a distillation job needs a student ({arch, layers}); to train the "
                    "teacher alone, set kind: teacher",
                    ("student",),
                    None,
                )
            )
        if self.kind == "teacher":
            for field in ("student", "comparison"):
                if getattr(self, field) is not None:
                    problems.append(
                        _problem(
                            "not_for_teacher_job",
                            f"a teacher job (kind: teacher) trains teacher.arch alone and has "
                            f"no {field}; remove it, and name the trained teacher in a "
                            "distillation job once this one has succeeded",
                            (field,),
                            "…",
                        )
                    )
            if self.teacher_training is None:
                problems.append(
                    _problem(
                        "missing_teacher_training",
                        "a teacher job needs its recipe: teacher_training: {iterations: N, "
                        "optimizer: {name: sgd, lr: 0.02, schedule: poly}}",
                        ("teacher_training",),
                        None,
                    )
                )
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    @model_validator(mode="after")
    def _resources_fit(self) -> JobSpec:
        """The global batch splits evenly over the processes, and GPUs need a GPU device."""
        resources = self.resources
        problems: list[InitErrorDetails] = []
        if self.batch_size % resources.world_size:
            problems.append(
                _problem(
                    "batch_not_divisible",
                    f"batch_size {self.batch_size} does not divide over "
                    f"{resources.world_size} processes; batch_size is the global batch, so "
                    f"make it a multiple of {resources.world_size} (e.g. "
                    f"{resources.world_size * max(1, self.batch_size // resources.world_size)})",
                    ("batch_size",),
                    self.batch_size,
                )
            )
        if resources.gpus is not None and self.device == "cpu":
            problems.append(
                _problem(
                    "gpus_on_cpu",
                    "resources.gpus asks for GPU processes but device is 'cpu'; use device "
                    "auto or cuda, or resources.processes for CPU processes",
                    ("resources", "gpus"),
                    resources.gpus,
                )
            )
        if resources.processes is not None and self.device == "cuda":
            problems.append(
                _problem(
                    "processes_on_cuda",
                    "resources.processes runs CPU processes but device is 'cuda'; use "
                    "resources.gpus for GPU processes",
                    ("resources", "processes"),
                    resources.processes,
                )
            )
        if problems:
            raise ValidationError.from_exception_data(type(self).__name__, problems)
        return self

    @model_validator(mode="after")
    def _layers_pair_up(self) -> JobSpec:
        # Layers left out are the registry's defaults, paired by maskd_core.validate.
        if self.student is None or self.teacher.layers is None or self.student.layers is None:
            return self
        if len(self.teacher.layers) != len(self.student.layers):
            raise ValueError(
                f"teacher.layers has {len(self.teacher.layers)} entries and student.layers has "
                f"{len(self.student.layers)}; they are paired by position, so list one student "
                "layer for every teacher layer"
            )
        return self


MASKD = "maskd"
"""The default method. Named here only to carry its task defaults and its former ``stage2``
fields into its params; everything else about it lives in ``maskd_core.methods``."""


class MaskdParams(StrictModel):
    """MasKD's settings, the params of method ``maskd``.

    Declared here rather than beside the other methods' params because the spec itself moves
    them from their former place in ``stage2`` (see ``_move_maskd_settings``).
    """

    loss_weight: float | None = Field(
        default=None,
        ge=0.0,
        description="Multiplies Σ_levels of the MasKD loss, a per-element mean: O(1–10). "
        "none: for detection the paper's weight for the student's detector family (RetinaNet "
        "7, FCOS and RepPoints 10, two-stage 1), for segmentation 1; the value used is in the "
        "run's summary.json (method_params). Segmentation: the official code's loss carries a "
        "factor 0.5 (0.5 · mean over n, t, c) under its λ = 1, which is loss_weight 0.5 here; "
        "our loss is the same plain mean in both tasks, so 1 is twice the official scale "
        "(logits often take less still: the quickstart uses 0.1).",
    )
    custom_mask: bool = Field(
        default=False,
        description="After the warm-up, multiply each teacher mask by the one the same tokens "
        "give on the aligned student; the job's task sets the default (on for detection).",
    )
    custom_mask_warmup: int = Field(
        default=5000, ge=0, description="Global steps before the custom mask is used."
    )
    mask_eps: float = Field(
        default=1e-6, gt=0.0, description="Added to each mask's area in the normalisation."
    )
    aux_weight: float | None = Field(
        default=None,
        ge=0.0,
        description="Segmentation: also distil the auxiliary head's logits (module "
        "'aux_classifier', e.g. torchvision's with args aux_loss: true on both models) "
        "through the tokens learned on the main logits, weighted by this relative to the main "
        "levels (the official recipe: 0.4, the aux head's share of the task loss). none: off.",
    )


STORED_MASKD_DEFAULTS = {"loss_weight": 1.0}
"""Defaults a stored spec may spell out that are no longer the field's: ``loss_weight`` was 1
before it followed the detector family (None now), and specs stored then carry 1 beside other
methods."""

STAGE2_MASKD_FIELDS = ("loss_weight", "custom_mask", "custom_mask_warmup", "mask_eps")
"""MasKD's settings that were once fields of ``stage2``; later ones were only ever params."""


def _move_maskd_settings(data: dict[str, Any], task_defaults: dict[str, Any]) -> dict[str, Any]:
    """MasKD's settings from their old place in ``stage2`` into every MasKD method's params.

    The task's MasKD defaults (the custom mask is on for detection) are filled in the same way,
    so a stored spec spells them out. A job that runs no MasKD may still carry the old fields at
    their defaults (specs stored before the move do), but not set to anything else: a weight on
    MasKD's scale silently ignored beside another method is how runs diverge unnoticed.
    """
    stage2 = data.get("stage2")
    if not isinstance(stage2, dict):
        return data
    stage2 = dict(stage2)
    legacy = {key: stage2.pop(key) for key in STAGE2_MASKD_FIELDS if key in stage2}
    entries: list[tuple[str, Any]] = [("stage2.method", stage2.get("method", MASKD))]
    comparison = data.get("comparison")
    comparison = comparison if isinstance(comparison, dict) else {}
    methods = comparison.get("methods")
    if isinstance(methods, list):
        entries = [(f"comparison.methods[{i}]", m) for i, m in enumerate(methods)]
    runs_maskd = False
    moved: list[Any] = []
    for where, entry in entries:
        method = {"name": entry} if isinstance(entry, str) else entry
        if not isinstance(method, dict) or method.get("name", MASKD) != MASKD:
            moved.append(entry)
            continue
        runs_maskd = True
        params = method.get("params", {})
        if not isinstance(params, dict):
            moved.append(entry)
            continue
        for key, value in legacy.items():
            if key in params and params[key] != value:
                raise ValueError(
                    f"MasKD's {key} is given twice, as stage2.{key} ({value!r}) and as "
                    f"{where}.params.{key} ({params[key]!r}); keep the one in params"
                )
        moved.append({**method, "params": {**task_defaults, **legacy, **params}})
    if not runs_maskd:
        fields = MaskdParams.model_fields
        defaults = {**{key: field.default for key, field in fields.items()}, **task_defaults}
        for key, value in legacy.items():
            if value != defaults[key] and value != STORED_MASKD_DEFAULTS.get(key):
                raise ValueError(
                    f"stage2.{key} is a MasKD setting and this job runs no MasKD; remove it and "
                    "set the method's own settings in its params (loss scales differ by orders "
                    "of magnitude between methods, see docs/methods.md)"
                )
    if isinstance(methods, list):
        data = {**data, "comparison": {**comparison, "methods": moved}}
    else:
        stage2["method"] = moved[0]
    return {**data, "stage2": stage2}


def _filled_by_every_task(section: str) -> frozenset[str]:
    """The fields of ``section`` (``stage1``, ``stage2``) that every task's defaults fill in:
    a spec may leave them out whatever its task."""
    return frozenset.intersection(*(frozenset(task[section]) for task in TASK_DEFAULTS.values()))


TASK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    # segmentation/train_mask_module.py and train_maskd.py of the official code.
    "segmentation": {
        "stage1": {
            "tokens": 8,
            "iterations": 10000,
            "mask_weighting": False,
            "optimizer": {
                "name": "sgd",
                "lr": 0.1,
                "momentum": 0.9,
                "weight_decay": 1e-3,
                "schedule": "poly",
            },
        },
        "stage2": {
            "iterations": 40000,
            "optimizer": {
                "name": "sgd",
                "lr": 0.02,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "schedule": "poly",
                "min_lr": 1e-4,
            },
        },
        MASKD: {"custom_mask": False},
    },
    # mmdetection/configs/maskd and mmrazor/configs/distill/maskd (RetinaNet/FCOS family).
    "detection": {
        "stage1": {
            "tokens": 6,
            "iterations": 2000,
            "mask_weighting": True,
            "optimizer": {
                "name": "adam",
                "lr": 0.01,
                "weight_decay": 1e-3,
                "schedule": "cosine",
                "min_lr": 1e-6,
            },
        },
        "stage2": {
            "iterations": 175920,
            "optimizer": {
                "name": "sgd",
                "lr": 0.01,
                "momentum": 0.9,
                "weight_decay": 1e-4,
                "schedule": "step",
                "warmup_steps": 500,
                "grad_clip": 35.0,
            },
        },
        MASKD: {"custom_mask": True},
    },
}
