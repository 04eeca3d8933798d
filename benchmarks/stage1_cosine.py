"""Stage-1 layer cosine of converted students against a real teacher, on held-out images (CPU is enough).

Converts TEACHER with each mapping (library `convert`, no training), runs student and teacher on evaluation images
the calibration never saw, and prints, per mapping, every student layer's mean token cosine to the teacher stream it
stands for (the block output, or the mid-block stream for a layer that took an attention sub-layer), aligned token by
token (ViM's cls sits in the middle) and on the student's residual channels. One JSON line per conversion.

    python benchmarks/stage1_cosine.py dinov2-s14 --img-size 112 --target vim-s \\
        --runs vit-vim-mlp:none vit-vim-interleaved:'fashion-mnist[:128]' vit-vim-interleaved:64 \\
        --eval 'fashion-mnist[1000:1064]'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.convert import fit
from tmconvert.converter.convert.engine import ConvertRequest, convert
from tmconvert.converter.data.calibration import calibration_batches
from tmconvert.converter.modelfile.converted import load_converted
from tmconvert.models import build_model


def layer_cosines(student_path: Path, teacher_path: Path, images: torch.Tensor) -> list[float]:
    cfg, state, metadata = load_converted(student_path)
    student = build_model(cfg)
    student.load_state_dict(state)
    teacher = open_checkpoint(teacher_path).model().eval()
    kept = metadata.get("index_sets", {}).get("residual", {}).get("indices", {}).get("None")
    order = [1 + p for p in range(cfg.num_patches)]
    order.insert(cfg.cls_index, 0)
    with torch.no_grad():
        s_out, t_out = student.eval().forward_all(images), teacher.forward_all(images)
    cosines = []
    for row in metadata["layer_plan"]:
        if row["block"] is None:
            continue
        streams = t_out.mid_tokens if row.get("sublayer") == "attn" else t_out.layer_tokens
        reference = streams[row["block"]][:, order]
        reference = reference if kept is None else reference[..., kept]
        got = s_out.layer_tokens[row["layer"]]
        cosines.append(F.cosine_similarity(got.flatten(1), reference.flatten(1), dim=-1).mean().item())
    return cosines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", type=Path)
    p.add_argument("--target", default="vim-s")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--runs", nargs="+", required=True, help="MAPPING:CALIB (CALIB: a --calib spec, N, or none)")
    p.add_argument("--eval", default="fashion-mnist[1000:1064]", help="held-out images (a --data spec)")
    p.add_argument("--score", default="magnitude")
    p.add_argument("--residue", type=float, default=None, help="fitted layers' residue (default: fit.RESIDUE)")
    args = p.parse_args()
    if args.residue is not None:  # an ablation of the shipped constant, read by fit_layers at call time
        fit.RESIDUE = args.residue
    cfg = open_checkpoint(args.teacher).config
    if args.img_size:
        cfg = dataclasses.replace(cfg, img_size=(args.img_size, args.img_size))
    images = torch.cat(list(calibration_batches(args.eval, cfg, seed=0)))
    with tempfile.TemporaryDirectory() as tmp:
        for run in args.runs:
            mapping, _, calib = run.partition(":")
            out = Path(tmp) / f"{mapping}.safetensors"
            began = time.perf_counter()
            request = ConvertRequest(
                source=args.teacher,
                target=args.target,
                mapping=mapping,
                img_size=args.img_size,
                calib=None if calib in ("", "none") else calib,
                score=args.score,
                out=out,
                force=True,
                verify=False,
            )
            convert(request)
            seconds = time.perf_counter() - began
            cosines = layer_cosines(out, args.teacher, images)
            row = {
                "mapping": mapping,
                "calib": calib or "none",
                "residue": fit.RESIDUE,
                "target": args.target,
                "eval": args.eval,
                "convert_s": round(seconds, 1),
                "mean": round(sum(cosines) / len(cosines), 4),
                "last": round(cosines[-1], 4),
                "layers": [round(c, 4) for c in cosines],
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
