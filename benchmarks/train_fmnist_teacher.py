"""Train the embedded default teacher: a DeiT-Tiny-like ViT on Fashion-MNIST (28 px, patch 4, 7x7 grid).

Run on a GPU machine (a few minutes on one H100/H200), from the checkout:
    python3 benchmarks/train_fmnist_teacher.py --data .data/fashion-mnist --out assets/fmnist-vit-t.safetensors

The weights are saved in fp16 with timm key names, so every reader and the converter take them as they are; the
test accuracy of the saved fp16 weights and the recipe go into the safetensors metadata.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from tmconvert.converter.data.fashion_mnist import load_fashion_mnist
from tmconvert.converter.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, grey_batch_to_input
from tmconvert.models.vit import VisionTransformer, ViTConfig

# DeiT-T/S/B widths at Fashion-MNIST's native 28 px with patch 4 (a 7x7 grid, 50 tokens).
ARCHS = {
    name: ViTConfig(
        embed_dim=d, depth=12, num_heads=d // 64, mlp_hidden=4 * d, patch_size=4, img_size=(28, 28), num_classes=10
    )
    for name, d in (("t", 192), ("s", 384), ("b", 768))
}


def augment(images_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random 28-px crop of the 2-px zero-padded image and a horizontal flip, on the GPU."""
    n = images_u8.shape[0]
    padded = F.pad(images_u8, (2, 2, 2, 2))
    dx = torch.randint(0, 5, (n,), device=images_u8.device, generator=gen)
    dy = torch.randint(0, 5, (n,), device=images_u8.device, generator=gen)
    rows = (dy[:, None] + torch.arange(28, device=images_u8.device)[None]).unsqueeze(2).expand(n, 28, 28)
    cols = (dx[:, None] + torch.arange(28, device=images_u8.device)[None]).unsqueeze(1).expand(n, 28, 28)
    out = padded[torch.arange(n, device=images_u8.device)[:, None, None], rows, cols]
    flip = torch.rand(n, device=images_u8.device, generator=gen) < 0.5
    return torch.where(flip[:, None, None], out.flip(-1), out)


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            logits = model(grey_batch_to_input(images[i : i + batch]))
        correct += (logits.argmax(-1) == labels[i : i + batch]).sum().item()
    return correct / len(labels)


def write_shards(state: dict[str, torch.Tensor], folder: Path, meta: dict[str, str], max_bytes: int) -> None:
    """Write `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` (the HF layout)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.nbytes for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total, **meta}, "weight_map": weight_map}, indent=1)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--arch", choices=sorted(ARCHS), default="t", help="DeiT-T/S/B width")
    p.add_argument(
        "--out",
        default="assets/fmnist-vit-t.safetensors",
        help="a .safetensors file, or a folder for sharded output (see --shard-mb)",
    )
    p.add_argument("--shard-mb", type=float, default=0, help="write HF-style shards of at most this size")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=3)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=0, help="stop early (smoke tests)")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, test = load_fashion_mnist("train", args.data), load_fashion_mnist("test", args.data)
    xtr = torch.from_numpy(train.images).to(device)
    ytr = torch.from_numpy(train.labels).to(device)
    xte = torch.from_numpy(test.images).to(device)
    yte = torch.from_numpy(test.labels).to(device)

    model = VisionTransformer(ARCHS[args.arch], seed=args.seed).to(device)
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim >= 2 and "pos_embed" not in n and "token" not in n]
    no_decay = [
        p_ for n, p_ in model.named_parameters() if not (p_.ndim >= 2 and "pos_embed" not in n and "token" not in n)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.999),
    )
    steps_per_epoch = len(ytr) // args.batch
    total = steps_per_epoch * args.epochs
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    gen = torch.Generator(device=device).manual_seed(args.seed)
    step, t0 = 0, time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ytr), device=device, generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch : (i + 1) * args.batch]
            x = grey_batch_to_input(augment(xtr[idx], gen))
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x), ytr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            if args.max_steps and step >= args.max_steps:
                break
        acc = evaluate(model, xte, yte)
        print(
            f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.4f} test acc {acc:.4f} ({time.time() - t0:.0f}s)",
            flush=True,
        )
        if args.max_steps and step >= args.max_steps:
            break

    # Ship fp16 weights and report the accuracy of exactly what ships.
    state = {k: v.detach().to(torch.float16).contiguous().cpu() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() for k, v in state.items()})
    acc16 = evaluate(model.float(), xte, yte)
    meta = {
        "format": "timm-vit",
        "dataset": "fashion-mnist",
        "test_top1": f"{acc16:.4f}",
        "input": json.dumps(
            {"img_size": 28, "channels": 3, "grey_to_rgb": True, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
        ),
        "recipe": json.dumps(vars(args)),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "train_seconds": f"{time.time() - t0:.0f}",
    }
    out = Path(args.out)
    if args.shard_mb:
        write_shards(state, out, meta, int(args.shard_mb * 2**20))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        save_file(state, str(tmp), metadata=meta)
        os.replace(tmp, out)
    print(
        json.dumps(
            {
                "out": str(out),
                "test_top1_fp16": acc16,
                "params": sum(v.numel() for v in state.values()),
                "seconds": time.time() - t0,
            }
        )
    )


if __name__ == "__main__":
    main()
