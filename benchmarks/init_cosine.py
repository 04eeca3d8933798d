"""Stage-1 measurement: how close is a converted ViM to its teacher right after initialisation?

For each shipped mapping strategy x teacher/student width pair x channel-scoring method, convert with
`--layers <teacher depth>` and report the per-layer cosine similarity of student and teacher token features on real
Fashion-MNIST test images (the `verify` measurement), plus top-1 agreement with the teacher. A default-initialised
student of the same config ("scratch") is the floor. Also measures the LayerNorm -> RMSNorm choice: how close
RMSNorm(x)*w is to the teacher's LN(x)*w + b on the same activations, with and without the LN bias.

    python benchmarks/init_cosine.py --teacher deit-t=assets/fmnist-vit-t.safetensors \
        --teacher deit-s=path/to/deit-s.safetensors [--teacher deit-b=...] [--images 256] [--json out.json]

Calibration images for activation scores come from the training split, evaluation images from the test split.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.configs import derive_target_config
from tmconvert.converter.convert.engine import ConvertRequest, convert
from tmconvert.converter.convert.subclone import uniform_indices
from tmconvert.converter.data.calibration import calibration_batches
from tmconvert.converter.data.fashion_mnist import load_fashion_mnist
from tmconvert.converter.mapping.files import shipped_mapping_paths
from tmconvert.converter.verify.numeric import verify_converted
from tmconvert.models.vim import VisionMamba

PAIRS = [("deit-s", "vim-s"), ("deit-b", "vim-s"), ("deit-s", "vim-t"), ("deit-t", "vim-t")]
SCORES = ["activation", "magnitude", "uniform"]


def write_pngs(split: str, count: int, folder: Path, data_root: str | None) -> Path:
    data = load_fashion_mnist(split, data_root)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(data.images[i]).save(folder / f"{i:05d}.png")
    return folder


@torch.no_grad()
def norm_choice(ckpt, images: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Mean over blocks and tokens of cos(RMSNorm(x)*w, LN(x)*w + b) and cos(RMSNorm(x)*w, LN(x)*w), x = norm1 input."""
    vit = ckpt.model().to(device).eval()
    inputs: list[torch.Tensor] = []
    hooks = [blk.norm1.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for blk in vit.blocks]
    vit.forward_all(images)
    for h in hooks:
        h.remove()
    with_bias, without_bias = [], []
    for blk, x in zip(vit.blocks, inputs, strict=True):
        w, b, eps = blk.norm1.weight, blk.norm1.bias, blk.norm1.eps
        rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
        ln = F.layer_norm(x, (x.shape[-1],), eps=eps)
        with_bias.append(F.cosine_similarity(rms, ln * w + b, dim=-1).mean().item())
        without_bias.append(F.cosine_similarity(rms, ln * w, dim=-1).mean().item())
    return {
        "rms_vs_ln_with_bias": sum(with_bias) / len(with_bias),
        "rms_vs_ln_without_bias": sum(without_bias) / len(without_bias),
    }


@torch.no_grad()
def scratch_cosine(ckpt, target: str, images: torch.Tensor, device: torch.device, seed: int) -> float:
    """Mean layer cosine of a default-initialised student (uniformly chosen residual channels) vs the teacher."""
    cfg = derive_target_config(target, ckpt.config)
    student = VisionMamba(cfg, seed=seed).to(device).eval()
    vit = ckpt.model().to(device).eval()
    s_out, t_out = student.forward_all(images), vit.forward_all(images)
    tokens, _ = cfg.token_layout().positions_in(ckpt.config.token_layout())
    tokens = tokens.to(device)
    keep = uniform_indices(ckpt.config.embed_dim, cfg.embed_dim).to(device)
    depth = min(ckpt.config.depth, cfg.depth)
    cos = [
        F.cosine_similarity(
            s_out.layer_tokens[j].double(), t_out.layer_tokens[j][:, tokens][..., keep].double(), dim=-1
        )
        .mean()
        .item()
        for j in range(depth)
    ]
    return sum(cos) / len(cos)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", action="append", default=[], help="NAME=PATH, NAME one of deit-t/s/b")
    p.add_argument("--images", type=int, default=256, help="calibration and evaluation images each")
    p.add_argument("--data", default=None, help="Fashion-MNIST folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write all numbers (per-layer cosines included) here")
    args = p.parse_args()
    teachers = dict(t.split("=", 1) for t in args.teacher)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="init-cosine-"))
    calib_dir = write_pngs("train", args.images, work / "calib", args.data)
    eval_dir = write_pngs("test", args.images, work / "eval", args.data)
    mappings = [path.stem for path in shipped_mapping_paths() if path.stem.startswith("vit-vim")]
    rows, started = [], time.time()
    for teacher_name, target in PAIRS:
        if teacher_name not in teachers:
            continue
        with open_checkpoint(teachers[teacher_name]) as ckpt:
            images = torch.cat(list(calibration_batches(str(eval_dir), ckpt.config, seed=0))).to(device)
            norms = norm_choice(ckpt, images, device)
            floor = scratch_cosine(ckpt, target, images, device, args.seed)
            rows.append(
                {"pair": f"{teacher_name}->{target}", "mapping": "scratch", "score": "-", "mean_cos": floor, **norms}
            )
            for mapping in mappings:
                for score in SCORES:
                    out = work / f"{teacher_name}-{target}-{mapping}-{score}.safetensors"
                    convert(
                        ConvertRequest(
                            source=Path(teachers[teacher_name]),
                            target=target,
                            mapping=mapping,
                            layers=ckpt.config.depth,
                            score=score,
                            seed=args.seed,
                            out=out,
                            calib=str(calib_dir) if score == "activation" else None,
                            verify=False,
                        )
                    )
                    rep = verify_converted(
                        out,
                        teacher=ckpt,
                        calib=str(eval_dir),
                        device=device,
                        max_images=args.images,
                        backends=["reference"],
                    )
                    inherited = [s.cosine for s in rep.layers if s.block is not None]
                    rows.append(
                        {
                            "pair": f"{teacher_name}->{target}",
                            "mapping": mapping,
                            "score": score,
                            "mean_cos": sum(inherited) / len(inherited),
                            "first": inherited[0],
                            "last": inherited[-1],
                            "final": rep.final_cosine,
                            "top1_agree": rep.top1_agreement,
                            "layers": [s.cosine for s in rep.layers],
                            "problems": rep.problems,
                        }
                    )
                    out.unlink()
                    print(
                        f"{rows[-1]['pair']:<16} {mapping:<14} {score:<10} mean {rows[-1]['mean_cos']:.3f} "
                        f"({time.time() - started:.0f}s)",
                        flush=True,
                    )
    print(
        f"\n{args.images} Fashion-MNIST test images, device {device}, "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}\n"
    )
    print("| pair | mapping | score | mean cos (inherited layers) | layer 0 | last inherited | final | top-1 agree |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["mapping"] == "scratch":
            print(f"| {r['pair']} | scratch (default init) | - | {r['mean_cos']:.3f} | | | | |")
            continue
        agree = "-" if r["top1_agree"] is None else f"{100 * r['top1_agree']:.1f} %"
        print(
            f"| {r['pair']} | {r['mapping']} | {r['score']} | {r['mean_cos']:.3f} | {r['first']:.3f} | "
            f"{r['last']:.3f} | {r['final']:.3f} | {agree} |"
        )
    print("\n| teacher | cos(RMSNorm(x)w, LN(x)w+b) | cos(RMSNorm(x)w, LN(x)w) |\n|---|---|---|")
    for r in rows:
        if r["mapping"] == "scratch":
            teacher = r["pair"].split("->")[0]
            print(f"| {teacher} | {r['rms_vs_ln_with_bias']:.3f} | {r['rms_vs_ln_without_bias']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
