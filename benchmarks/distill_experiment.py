"""Stage-2 experiment: what stage-1 conversion and adaptive multi-directional distillation buy, on Fashion-MNIST.

Every arm trains the same student architecture for the same steps with the same recipe, batch, data order and seed;
only the starting weights and the loss differ:

    a            from scratch, task loss only             (the baseline the paper compares with)
    b            converted (stage 1), task loss only      (what the initialisation alone gives)
    c            converted, full distillation             (TransMamba: stage 1 + stage 2)
    d            from scratch, full distillation          (CE + KD + adaptive multi-directional alignment, even pairs)
    c-uniform    c with uniform layer weights             (adaptive weights off)
    c-forward    c aligning the forward direction only    (multi-directional off)
    c-nofeature  c without feature alignment              (CE + KD)
    c-nokd       c without logit KD                       (CE + feature alignment)
    c-even       c with the even layer pairing            (instead of the conversion's layer plan)

The letters follow issue #6. Also evaluated once: the teacher, and each seed's converted student before training
(`c0`). Learning rates get the same care for every arm: with `--lrs` each arm trains at each rate on the training
split minus a hold-out of `--val-images` images, the summary picks each arm's rate by its mean top-1 on that
hold-out, and reports the test top-1 of the chosen rate (the test set never chooses anything). Results are appended to
`OUT/results.jsonl` (one line per arm, seed and step count: test top-1/top-5/loss, training time, final training
losses); runs already there are skipped and an interrupted run resumes from its checkpoint, so the table can be
filled over several invocations (`--max-minutes` stops cleanly before a time limit). `OUT/summary.md` gets the
mean ± std over seeds per arm and step count.

    python benchmarks/distill_experiment.py --out runs/exp --steps 500,2000 --seeds 0,1,2 --lrs 5e-4,1e-3,2e-3
    python benchmarks/distill_experiment.py --out runs/exp --seeds 0 --lrs 5e-4,1e-3,2e-3 && \\
    python benchmarks/distill_experiment.py --out runs/exp --seeds 1,2 --lrs best      # sweep on seed 0 only
    benchmarks/distill_experiment_parallel.sh 2 runs/exp --seeds 0 --lrs ... \\
        --workers 6                                                 # 2 shard processes per visible GPU (graph steps)
    python benchmarks/distill_experiment.py --out /tmp/exp --steps 2 --seeds 0 --batch-size 8 \\
        --eval-limit 32 --workers 0                                                                 # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tmconvert.converter.convert.engine import ConvertRequest, convert
from tmconvert.converter.data.loaders import ImageDataset, eval_batches
from tmconvert.converter.data.preprocess import InputSpec, Preprocess
from tmconvert.converter.data.sources import open_source
from tmconvert.converter.distill.processes import DistContext, init_distributed
from tmconvert.converter.distill.recipe import load_recipe
from tmconvert.converter.distill.run import DistillRequest, prepare_run, run_distillation
from tmconvert.converter.modelfile.classifier import load_classifier
from tmconvert.converter.verify.accuracy import measure_accuracy

ROOT = Path(__file__).resolve().parents[1]
TASK_ONLY = ["loss.kd=0", "loss.feature=0"]
# arm -> (start from the converted student?, recipe overrides)
ARMS: dict[str, tuple[bool, list[str]]] = {
    "a": (False, TASK_ONLY),
    "b": (True, TASK_ONLY),
    "c": (True, []),
    "d": (False, []),
    "c-uniform": (True, ["loss.adaptive=false"]),
    "c-forward": (True, ["loss.multi_directional=false"]),
    "c-nofeature": (True, ["loss.feature=0"]),
    "c-nokd": (True, ["loss.kd=0"]),
    "c-even": (True, ["loss.pairs=even"]),
}


def default_data() -> str:
    local = ROOT / ".data" / "fashion-mnist"
    return f"fashion-mnist:{local}" if local.is_dir() else "fashion-mnist"


def _done(results: Path) -> set[tuple[str, int, int, float | None]]:
    if not results.exists():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["arm"], r["seed"], r["steps"], r.get("lr")) for r in rows}


def _split_data(args: argparse.Namespace) -> tuple[str, str | None]:
    """(training data, validation data): the last `--val-images` training images are held out for choosing rates."""
    if not args.val_images:
        return args.data, None
    return f"{args.data}[:-{args.val_images}]", f"{args.data}[-{args.val_images}:]"


def _append(results: Path, row: dict[str, Any]) -> None:
    with open(results, "a") as handle:
        handle.write(json.dumps(row, sort_keys=True) + "\n")
    print(json.dumps(row, sort_keys=True), flush=True)


def _test_accuracy(
    model_path: Path, data: str, args: argparse.Namespace, device: torch.device, split: str = "test"
) -> dict[str, Any]:
    loaded = load_classifier(model_path)
    spec = InputSpec.for_model(loaded.config.img_size, loaded.config.in_chans, loaded.metadata)  # as `tmconvert eval`
    source = open_source(data, split=split, img_size=spec.img_size, num_classes=loaded.config.num_classes)
    dataset = ImageDataset(source, Preprocess(spec, train=False))
    batches = eval_batches(dataset, batch_size=512, limit=args.eval_limit, workers=args.workers)
    result = measure_accuracy(loaded.model.to(device), batches, num_classes=loaded.config.num_classes, device=device)
    return {"top1": result.top1, "top5": result.top5, "test_loss": result.loss, "test_images": result.images}


def _converted(args: argparse.Namespace, seed: int) -> Path:
    """The converted student for one seed; shards may race to make it, and conversion is deterministic, so the last
    atomic write wins with identical bytes."""
    path = args.out / f"converted-{args.target}-s{seed}.safetensors"
    if not path.exists():
        request = ConvertRequest(
            source=args.teacher, target=args.target, out=path, seed=seed, mapping=args.mapping, force=True
        )
        convert(request)
    return path


def train_or_resume(
    teacher: Path, student: str, data: str, folder: Path, recipe: Any, dist: DistContext, deadline: float
) -> tuple[dict[str, Any], float | None] | None:
    """One distillation run into `folder`, resumed from its checkpoint if there is one: its final losses and seconds
    (None when the student was already there), or None when the time ran out first (the checkpoint is kept)."""
    if (folder / "student.safetensors").exists():
        return json.loads((folder / "student.config.json").read_text())["distill"]["final"], None
    resume = (folder / "checkpoint.pt").exists()
    request = DistillRequest(
        teacher=teacher,
        student=student,
        data=data,
        out=folder,
        recipe=recipe,
        resume=resume,
        force=not resume,
        time_limit=max(1.0, deadline - time.monotonic()),
    )
    result = run_distillation(prepare_run(request, dist))
    return (result.final, result.seconds) if result.finished else None


def _run_arm(
    arm: str, seed: int, steps: int, lr: float | None, args: argparse.Namespace, dist: DistContext, deadline: float
) -> dict[str, Any] | None:
    """Train (or resume) one arm; None when the time budget ran out first (its checkpoint is kept)."""
    from_converted, overrides = ARMS[arm]
    student = str(_converted(args, seed)) if from_converted else args.target
    rate = "" if lr is None else f"-lr{lr:g}"
    folder = args.out / "runs" / f"{arm}{rate}-s{seed}-n{steps}"
    train_data, val_data = _split_data(args)
    flags = {"steps": steps, "batch_size": args.batch_size, "seed": seed, "optim.lr": lr}
    loaded = load_recipe(args.recipe, [f"data.workers={args.workers}", *args.set, *overrides], flags)
    trained = train_or_resume(args.teacher, student, train_data, folder, loaded, dist, deadline)
    if trained is None:
        return None
    final, seconds = trained
    row = {
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "lr": lr,
        "train_seconds": seconds,
        **{k: final.get(k) for k in ("loss", "task", "kd", "feature")},
    }
    row.update(_test_accuracy(folder / "student.safetensors", args.data, args, dist.device))
    if val_data is not None:
        val = _test_accuracy(folder / "student.safetensors", val_data, args, dist.device, split="train")
        row["val_top1"] = val["top1"]
    return row


ByRate = dict[float | None, list[dict[str, Any]]]


def _read_rows(results: Path) -> dict[tuple[str, int], ByRate]:
    """results.jsonl grouped by (arm, steps), then by learning rate."""
    groups: dict[tuple[str, int], ByRate] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                groups.setdefault((r["arm"], r["steps"]), {}).setdefault(r.get("lr"), []).append(r)
    return groups


def _holdout_scores(by_lr: ByRate) -> dict[float | None, float]:
    """Mean hold-out top-1 per rate over the seeds every rate was run with (a sweep may use seed 0 only and the
    chosen rate more seeds: comparing means over different seeds would favour whichever rate got the luckier ones)."""
    common = set.intersection(*({r["seed"] for r in rs} for rs in by_lr.values()))
    scores = {}
    for lr, rs in by_lr.items():
        vals = [r["val_top1"] for r in rs if r.get("val_top1") is not None and r["seed"] in common]
        scores[lr] = statistics.mean(vals) if vals else float("-inf")
    return scores


def _chosen_rate(by_lr: ByRate) -> float | None:
    scores = _holdout_scores(by_lr)
    return max(by_lr, key=lambda lr: scores[lr]) if len(by_lr) > 1 else next(iter(by_lr))


def _best_rates(results: Path, arms: list[str], steps: list[int]) -> dict[tuple[str, int], float]:
    """`--lrs best`: each (arm, steps) trains at the rate its earlier sweep chose on the hold-out; the ablations of c
    (c-*) use c's rate, as ablations usually do."""
    groups = _read_rows(results)
    rates = {}
    for arm in arms:
        source = "c" if arm.startswith("c-") else arm
        for n in steps:
            rate = _chosen_rate(groups[(source, n)]) if (source, n) in groups else None
            if rate is None:
                raise SystemExit(f"--lrs best: no learning-rate sweep of arm {source} at {n} steps in {results}")
            rates[(arm, n)] = rate
    return rates


def _summary(results: Path) -> str:
    """Per arm and step count, the rate with the best mean hold-out top-1 (when rates were swept) and its test top-1."""
    order = ["teacher", "c0", *ARMS]
    lines = [
        "| arm | steps | lr (chosen on hold-out) | seeds | test top-1 % (mean ± std) | hold-out top-1 % by lr |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    groups = _read_rows(results)
    for (arm, steps), by_lr in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        scores = _holdout_scores(by_lr)
        best = _chosen_rate(by_lr)
        accs = [100 * r["top1"] for r in by_lr[best]]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        sweep = ", ".join(
            f"{lr:g}: {100 * scores[lr]:.2f}"
            for lr in sorted(by_lr, key=lambda v: v or 0)
            if lr is not None and scores[lr] > float("-inf")
        )
        chosen = "recipe" if best is None else f"{best:g}"
        lines.append(
            f"| {arm} | {steps} | {chosen} | {len(accs)} | {statistics.mean(accs):.2f} ± {std:.2f} | {sweep} |"
        )
    return "\n".join(lines) + "\n" + _targets(groups)


def _targets(groups: dict[tuple[str, int], ByRate]) -> str:
    """Issue #6's two targets, from each arm's chosen-rate mean test top-1: (c) at least 2 points above (a) at equal
    steps, and (c) reaching (a)'s final accuracy (at a's largest step count) within a third of those steps."""
    mean = {key: statistics.mean(100 * r["top1"] for r in by_lr[_chosen_rate(by_lr)]) for key, by_lr in groups.items()}
    steps_a = sorted(n for arm, n in mean if arm == "a")
    steps_c = sorted(n for arm, n in mean if arm == "c")
    if not steps_a or not steps_c:
        return ""
    lines = ["", "Targets (mean test top-1 at each arm's chosen rate):", ""]
    for n in sorted(set(steps_a) & set(steps_c)):
        gap = mean[("c", n)] - mean[("a", n)]
        verdict = "met" if gap >= 2 - 1e-9 else "missed"
        lines.append(f"- {n} steps: (c) - (a) = {gap:+.2f} points (target >= +2: {verdict})")
    final_steps = steps_a[-1]
    final = mean[("a", final_steps)]
    reached = [n for n in steps_c if mean[("c", n)] >= final]
    if reached:
        ratio = reached[0] / final_steps
        verdict = "met" if ratio <= 1 / 3 else "missed"
        lines.append(
            f"- (c) reaches (a)'s {final_steps}-step accuracy ({final:.2f} %) at {reached[0]} steps, "
            f"{ratio:.2f}x the steps (target <= 1/3: {verdict})"
        )
    else:
        lines.append(
            f"- (c) does not reach (a)'s {final_steps}-step accuracy ({final:.2f} %) at any step count run "
            f"(target: within 1/3 of the steps: missed)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=ROOT / "assets" / "fmnist-vit-t.safetensors")
    parser.add_argument("--target", default="vim-t", help="student architecture (registry name)")
    parser.add_argument("--mapping", default=None, help="conversion mapping (default: the target's default)")
    parser.add_argument("--data", default=default_data(), help="fashion-mnist[:ROOT] or a class-folder tree")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", default="500,2000", help="comma list of step counts")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--lrs",
        default="",
        help="comma list of peak learning rates to sweep per arm (default: the "
        "recipe's optim.lr), or 'best': the rate an earlier sweep in OUT chose for the arm (c's for "
        "the c-* ablations)",
    )
    parser.add_argument("--summary-only", action="store_true", help="write OUT/summary.md from the results and stop")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="score the teacher, convert and score each seed's "
        "student, and stop (run once before starting shards, so they never convert concurrently)",
    )
    parser.add_argument(
        "--val-images",
        type=int,
        default=5000,
        help="training images held out to choose the rate (0: train on all, no hold-out)",
    )
    parser.add_argument("--recipe", default=None, help="recipe file or shipped name (default: default)")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override for every arm")
    parser.add_argument("--eval-limit", type=int, default=None, help="test images per evaluation (default: all)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default=None, choices=(None, "cpu", "cuda"))
    parser.add_argument("--max-minutes", type=float, default=None, help="stop launching and stop training after")
    parser.add_argument(
        "--shard",
        default="0/1",
        help="I/K: run every K-th training job starting at the I-th, so K "
        "processes (one GPU each, or several per GPU) fill one OUT together; shard 0 also scores the "
        "teacher and the converted students",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "distill-experiment")
    args = parser.parse_args()
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    try:
        shard, n_shards = (int(v) for v in args.shard.split("/"))
    except ValueError:
        parser.error(f"--shard {args.shard!r}: expected I/K with integers 0 <= I < K")
    if not 0 <= shard < n_shards:
        parser.error(f"--shard {args.shard!r}: expected I/K with integers 0 <= I < K")

    if args.summary_only:
        summary = _summary(args.out / "results.jsonl")
        (args.out / "summary.md").write_text(summary)
        print(summary)
        return
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else float("inf")
    dist = init_distributed(args.device)
    results = args.out / "results.jsonl"
    done = _done(results)
    seeds = [int(s) for s in args.seeds.split(",")]
    if shard == 0 and ("teacher", 0, 0, None) not in done:
        _append(
            results,
            {"arm": "teacher", "seed": 0, "steps": 0, **_test_accuracy(args.teacher, args.data, args, dist.device)},
        )
    for seed in seeds:
        if shard != 0 or not any(ARMS[a][0] for a in args.arms.split(",")):
            continue
        student = _converted(args, seed)  # made here even when already scored, so shards find it
        if ("c0", seed, 0, None) not in done:
            _append(
                results,
                {"arm": "c0", "seed": seed, "steps": 0, **_test_accuracy(student, args.data, args, dist.device)},
            )
    if args.prepare_only:
        return
    arms, step_counts = args.arms.split(","), [int(s) for s in args.steps.split(",")]
    if args.lrs == "best":
        best = _best_rates(results, arms, step_counts)
        jobs = [(arm, seed, n, best[(arm, n)]) for n in step_counts for arm in arms for seed in seeds]
    else:
        lrs: list[float | None] = [float(v) for v in args.lrs.split(",") if v] or [None]
        jobs = [(arm, seed, n, lr) for n in step_counts for arm in arms for lr in lrs for seed in seeds]
    for arm, seed, steps, lr in jobs[shard::n_shards]:
        if (arm, seed, steps, lr) in done:
            continue
        if time.monotonic() >= deadline:
            print(f"time budget spent; rerun to continue ({results})", flush=True)
            break
        row = _run_arm(arm, seed, steps, lr, args, dist, deadline)
        if row is None:
            print(f"{arm} lr {lr} seed {seed} {steps} steps stopped at the time budget; rerun to resume", flush=True)
            break
        _append(results, row)
    summary = _summary(results)
    (args.out / "summary.md").write_text(summary)
    print(summary)


if __name__ == "__main__":
    main()
