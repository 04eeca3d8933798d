"""Distillation throughput: images/s of one training step (teacher forward + student forward/backward + optimizer).

Default shapes are the paper's ImageNet setting: a DeiT-B-shaped teacher (random weights: throughput does not depend
on their values) and a ViM-S student at 224 px, bf16 autocast, the default recipe's full loss (CE + KD + adaptive
bidirectional feature alignment on the even layer pairing). Batches are random tensors made on the device, so the
number is the model's, not the image loader's. On a GPU it also reports the share of the step spent in the
selective-scan kernels (from the CUDA profiler: kernels whose name contains "scan").

    python benchmarks/distill_throughput.py                                  # one GPU, CUDA-graph steps (auto)
    python benchmarks/distill_throughput.py --cuda-graph false               # one GPU, eager steps
    torchrun --nproc_per_node 2 benchmarks/distill_throughput.py             # two GPUs (DDP, NCCL; eager steps)
    python benchmarks/distill_throughput.py --teacher deit-t --student vim-t --img-size 28 \\
        --patch-size 4                                                       # the Fashion-MNIST experiment's step
    python benchmarks/distill_throughput.py --tiny --steps 3 --warmup 1      # CPU smoke test

Prints one JSON line (rank 0): configuration, img/s over all processes, per-GPU img/s, ms/step, peak memory, scan
share and the scan backend. Peak memory counts the tensors allocated during the timed steps; a CUDA graph's
activations live in its private pool, reserved at capture, so with graphs look at `reserved_memory_gib` (everything
the caching allocator holds) as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
import torch.distributed as torch_dist

from tmconvert.converter.configs import derive_target_config
from tmconvert.converter.distill.processes import init_distributed
from tmconvert.converter.distill.recipe import Recipe
from tmconvert.converter.distill.run import even_pairs
from tmconvert.converter.distill.trainer import Trainer, build_loss
from tmconvert.kernels import resolve_backend
from tmconvert.models.registry import get_config
from tmconvert.models.vim import VimConfig, VisionMamba
from tmconvert.models.vit import VisionTransformer, ViTConfig

TINY_TEACHER = ViTConfig(
    embed_dim=32, depth=2, num_heads=2, mlp_hidden=64, patch_size=4, img_size=(32, 32), num_classes=10
)
TINY_STUDENT = VimConfig(embed_dim=16, depth=4, d_state=4, patch_size=4, img_size=(32, 32), num_classes=10)


def _models(args: argparse.Namespace) -> tuple[ViTConfig, VimConfig]:
    if args.tiny:
        return TINY_TEACHER, TINY_STUDENT
    teacher = dataclasses.replace(get_config(args.teacher), img_size=(args.img_size, args.img_size))
    if args.patch_size:
        teacher = dataclasses.replace(teacher, patch_size=args.patch_size)
    return teacher, derive_target_config(args.student, teacher)


def _scan_share(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor, steps: int) -> float | None:
    """Fraction of GPU kernel time spent in selective-scan kernels over `steps` profiled steps."""
    if images.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            trainer.train_step(images, labels)
        torch.cuda.synchronize()
    total = scan = 0.0
    for event in prof.key_averages():
        device_time = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
        total += device_time
        if "scan" in event.key.lower():
            scan += device_time
    return scan / total if total else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="deit-b", help="registry name of the teacher shape")
    parser.add_argument("--student", default="vim-s", help="registry name of the student")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="teacher (and student) patch size (default: the teacher's; 4 for the Fashion-MNIST models at 28 px)",
    )
    parser.add_argument("--batch-per-gpu", type=int, default=128, help="images per process and step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (kernel compilation, autotune)")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps for the scan share (GPU)")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"))
    parser.add_argument(
        "--cuda-graph",
        default="auto",
        choices=("auto", "true", "false"),
        help="run.cuda_graph: replay steps as CUDA graphs (auto: on one GPU, never under torchrun)",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny models at 32 px (CPU smoke test)")
    args = parser.parse_args()

    dist = init_distributed()
    teacher_cfg, student_cfg = _models(args)
    steps = args.warmup + args.steps + args.profile_steps
    batch = args.batch_per_gpu * dist.world
    graph = {"auto": "auto", "true": True, "false": False}[args.cuda_graph]
    recipe = Recipe.model_validate({"steps": steps, "batch_size": batch, "run": {"amp": args.amp, "cuda_graph": graph}})
    torch.manual_seed(0)
    teacher = VisionTransformer(teacher_cfg, seed=0)
    student = VisionMamba(student_cfg, seed=0)
    loss = build_loss(recipe, student, teacher_cfg, even_pairs(student_cfg.depth, teacher_cfg.depth))
    trainer = Trainer(teacher, student, loss, recipe, dist)
    device = dist.device
    gen = torch.Generator(device=device).manual_seed(dist.rank)
    images = torch.randn(args.batch_per_gpu, 3, *teacher_cfg.img_size, device=device, generator=gen)
    labels = torch.randint(0, teacher_cfg.num_classes, (args.batch_per_gpu,), device=device, generator=gen)

    for _ in range(args.warmup):
        trainer.train_step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(images, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    seconds = time.perf_counter() - start
    share = _scan_share(trainer, images, labels, args.profile_steps) if args.profile_steps else None
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    reserved = torch.cuda.memory_reserved(device) / 2**30 if device.type == "cuda" else None
    if dist.is_main:
        images_total = args.steps * args.batch_per_gpu * dist.world
        print(
            json.dumps(
                {
                    "teacher": "tiny" if args.tiny else args.teacher,
                    "student": "tiny" if args.tiny else args.student,
                    "img_size": teacher_cfg.img_size[0],
                    "patch_size": teacher_cfg.patch_size,
                    "world": dist.world,
                    "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "batch_per_gpu": args.batch_per_gpu,
                    "amp_bf16": trainer.amp,
                    "cuda_graph": trainer.cuda_graph,
                    "scan_backend": resolve_backend(device),
                    "images_per_second": round(images_total / seconds, 1),
                    "images_per_second_per_gpu": round(images_total / seconds / dist.world, 1),
                    "ms_per_step": round(1000 * seconds / args.steps, 2),
                    "scan_share": round(share, 4) if share is not None else None,
                    "peak_memory_gib": round(peak, 2) if peak is not None else None,
                    "reserved_memory_gib": round(reserved, 2) if reserved is not None else None,
                    "torch": torch.__version__,
                }
            )
        )
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


if __name__ == "__main__":
    main()
