"""Distillation recipes: YAML validated by pydantic, with command-line overrides.

The schema's defaults are the stage-2 recipe as far as it is known (docs/method.md: AdamW, wd 0.05, warm-up + cosine,
label smoothing 0.1, KD at T = 2, adaptive cosine alignment of every scan direction). The shipped
`recipes/default.yaml` spells them out with a comment on every field; a test keeps the two identical.

Overrides (`--set optim.lr=1e-3`, repeated, and the flags `--steps`, `--batch-size`, `--lr`, `--seed`, `--pairs`)
are written into the YAML data before validation, so a bad override is reported exactly like a bad file: one line
per problem naming where it came from (`recipe.yaml:12: optim.lr: ...` or `--set optim.lr=abc: ...`). YAML is read
with `yaml.safe_load` only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
)
from pydantic import ValidationError as PydanticValidationError

from tmconvert.converter.distill.errors import RecipeError
from tmconvert.converter.yamlfile import YamlDocument, read_yaml

FORMAT_VERSION = 1
PROJECTORS = ("auto", "identity", "pad", "linear", "mlp")
GRID_MATCHES = ("pool", "interpolate")  # how a hierarchical student's stage grid meets the teacher's (grids.py)
DEFAULT_GRID_MATCH = "interpolate"

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Pair = tuple[NonNegativeInt, NonNegativeInt]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimRecipe(_Section):
    """AdamW with linear warm-up then cosine decay to `min_lr`, global gradient-norm clipping."""

    lr: PositiveFloat = 5e-4
    weight_decay: NonNegativeFloat = 0.05
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    warmup_fraction: Fraction = 0.05
    min_lr: NonNegativeFloat = 1e-6
    grad_clip: NonNegativeFloat = 1.0


class LossRecipe(_Section):
    """Weights and switches of the loss pieces (a weight of 0 turns a piece off)."""

    task: NonNegativeFloat = 1.0
    label_smoothing: Fraction = 0.1
    kd: NonNegativeFloat = 1.0
    temperature: PositiveFloat = 2.0
    feature: NonNegativeFloat = 1.0
    adaptive: bool = True
    multi_directional: bool = True
    projector: Literal[PROJECTORS] = "auto"
    min_similarity: Annotated[float, Field(gt=0.0, le=1.0)] = 0.05
    pairs: Literal["plan", "even"] | list[Pair] = "plan"
    grid: Literal[GRID_MATCHES] = DEFAULT_GRID_MATCH  # hierarchical students (VMamba) only: see grids.py


class DataRecipe(_Section):
    """Train-time augmentation and loading."""

    augment: Literal["auto", "pad_crop", "resized_crop", "none"] = "auto"
    hflip: bool = True
    scale: tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]] = (0.08, 1.0)
    pad: Annotated[float, Field(ge=0.0, le=0.5)] = 0.07
    workers: NonNegativeInt = 4


class StudentRecipe(_Section):
    drop_path: Fraction = 0.0


class AlignRecipe(_Section):
    """Layer-wise alignment before distillation (`align.py`): extra steps with their own AdamW (betas and eps are
    `optim`'s) and their own warm-up + cosine; 0 steps turns the phase off."""

    steps: NonNegativeInt = 0
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    warmup_fraction: Fraction = 0.05
    min_lr: NonNegativeFloat = 1e-6
    grad_clip: NonNegativeFloat = 1.0


class RunRecipe(_Section):
    """How the run is carried out; changing these does not change what is computed (not in the fingerprint)."""

    amp: Literal["auto", "bf16", "off"] = "auto"
    cuda_graph: Literal["auto"] | bool = "auto"  # one CUDA process: replay steps as graphs (docs/distill.md)
    checkpoint_every: NonNegativeInt = 500
    log_every: PositiveInt = 10

    @field_validator("amp", mode="before")
    @classmethod
    def _bare_off(cls, value: object) -> object:
        """YAML reads a bare `off` as false."""
        return "off" if value is False else value


class Recipe(_Section):
    recipe: Literal[1] = Field(FORMAT_VERSION, description="recipe format version")
    name: str | None = None
    steps: PositiveInt = 2000
    batch_size: PositiveInt = 128
    seed: NonNegativeInt = 0
    optim: OptimRecipe = OptimRecipe()
    loss: LossRecipe = LossRecipe()
    data: DataRecipe = DataRecipe()
    student: StudentRecipe = StudentRecipe()
    align: AlignRecipe = AlignRecipe()
    run: RunRecipe = RunRecipe()

    def to_json(self) -> dict[str, Any]:
        """The recipe as JSON; the `align` section only when the phase is on, and `loss.grid` only when it is not
        the default, so a run without them records (and fingerprints) exactly what it did before they existed."""
        data = self.model_dump(mode="json")
        if not self.align.steps:
            del data["align"]
        if self.loss.grid == DEFAULT_GRID_MATCH:
            del data["loss"]["grid"]  # likewise for runs from before hierarchical students
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_json(), sort_keys=False)

    def fingerprint_view(self) -> dict[str, Any]:
        """What the training computes depends on: everything but `run` and the worker count."""
        data = self.to_json()
        data.pop("run")
        data["data"].pop("workers")
        return data


@dataclass(frozen=True)
class LoadedRecipe:
    recipe: Recipe
    source: str  # file path (a shipped recipe's is inside the installed package)
    sha256: str  # of the file as read (overrides not included)
    overrides: tuple[str, ...]


def shipped_recipe_paths() -> dict[str, Path]:
    """Shipped recipes by name (`default` for `recipes/default.yaml`)."""
    folder = resources.files("tmconvert.recipes")
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def find_recipe(name_or_path: str | None) -> Path:
    """A recipe file path, or the name of a shipped recipe (`default`); None is the default recipe."""
    if name_or_path is None:
        name_or_path = "default"
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate  # reading it says what is wrong with it: missing, not a regular file, ...
    shipped = shipped_recipe_paths()
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise RecipeError(f"unknown recipe {name_or_path!r}; shipped recipes: {', '.join(sorted(shipped)) or 'none'}")


def parse_pairs(text: str) -> str | list[list[int]]:
    """`--pairs`: `plan`, `even`, or `S:T,S:T,...` (student layer : teacher block)."""
    text = text.strip()
    if text in ("plan", "even"):
        return text
    pairs = []
    for item in text.split(","):
        left, sep, right = item.strip().partition(":")
        if not sep or not left.strip().isdigit() or not right.strip().isdigit():
            raise RecipeError(f"--pairs {text}: expected plan, even, or STUDENT:TEACHER pairs like 0:0,2:1 ({item!r})")
        pairs.append([int(left), int(right)])
    return pairs


def _set_path(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    keys = dotted.split(".")
    if not all(keys):
        raise RecipeError(f"{origin}: bad key {dotted!r}")
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{origin}: {'.'.join(keys[: i + 1])} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _related(error_key: str, override_key: str) -> bool:
    """Whether an override is to blame for an error at `error_key`: the error is at or under the key it set, or
    above it (`--set nosuch.field=1` creates the unknown section `nosuch`)."""
    return (
        error_key == override_key
        or override_key.startswith(error_key + ".")
        or error_key.startswith(override_key + ".")
    )


def load_recipe(
    name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = (), flags: dict[str, Any] | None = None
) -> LoadedRecipe:
    """Read a recipe, apply `--set KEY=VALUE` overrides then the flag values (`{'optim.lr': 1e-3}`), validate."""
    path = find_recipe(name_or_path)
    doc = read_yaml(path, RecipeError, "recipe")
    recipe, problems = _validate(doc, overrides, flags or {})
    if recipe is None:
        raise RecipeError("; ".join(problems))
    return LoadedRecipe(recipe, str(path), hashlib.sha256(doc.raw).hexdigest(), tuple(overrides))


def recipe_problems(path: Path) -> list[str]:
    """Every problem of a recipe file, each as `file:line: yaml.path: message` (what `tmconvert check` reports)."""
    doc = read_yaml(path, RecipeError, "recipe")
    duplicates = [f"{path}:{line}: {_dotted(loc)}: duplicate key" for loc, line in doc.duplicates]
    return duplicates + _validate(doc, (), {})[1]


def _validate(
    doc: YamlDocument, overrides: list[str] | tuple[str, ...], flags: dict[str, Any]
) -> tuple[Recipe | None, list[str]]:
    """The recipe with the overrides applied, or None and one line per problem naming where it came from."""
    path, data = doc.path, doc.data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None, [f"{path}: a recipe is a YAML mapping (recipe: {FORMAT_VERSION}, steps: ..., optim: ...)"]
    lines = doc.lines
    origins: dict[str, str] = {}
    for item in overrides:
        key, sep, value_text = item.partition("=")
        origin = f"--set {item}"
        if not sep or not key.strip():
            raise RecipeError(f"{origin}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
        try:
            value = yaml.safe_load(value_text) if value_text.strip() else None
        except yaml.YAMLError:
            raise RecipeError(f"{origin}: the value is not valid YAML") from None
        _set_path(data, key.strip(), value, origin)
        origins[key.strip()] = origin
    for key, value in flags.items():
        if value is not None:
            flag = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
            _set_path(data, key, value, flag)
            origins[key] = f"{flag} {value}"
    try:
        return Recipe.model_validate(data), []
    except PydanticValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            dotted = _dotted(loc)
            origin = next((o for k, o in origins.items() if _related(dotted, k)), None)
            if origin is None:
                key = loc
                while key and key not in lines:
                    key = key[:-1]
                origin = f"{path}:{lines[key]}" if key in lines else str(path)
            problems.append(f"{origin}: {dotted}: {err['msg']}")
        return None, problems
