"""Weights and Fashion-MNIST packed small enough to travel to a GPU machine, and unpacked there.

A device call sends at most 64 MiB (the checkout, about 12 MB of it with the embedded teacher, plus what it carries)
and gives back files of at most 16 MiB. A DINOv2-S/14 teacher is 88 MB in fp32 and 44 MB in fp16; Fashion-MNIST's
IDX files are 31 MB gzipped. Packs get both under the limit, losslessly for what they are given:

- `teacher`: any checkpoint tmconvert reads (a `.safetensors` file keeps its names and metadata; a Hugging Face
  folder or a torch file is read through `open_checkpoint`, in canonical timm names). `--dtype bf16` (the default)
  stores every tensor of at least 65,536 values (the matrices) in bfloat16, everything else (biases, norms,
  LayerScale, position embedding, cls token, a small head) in float32; `--dtype keep` stores the tensors as they are
  (what the fine-tuned teacher, already written in its shipped precision, is packed with). 2-byte tensors are split
  into their high bytes (sign, exponent: ~3 bits of entropy each) and low bytes before LZMA: 30 MB for the 22 M
  DINOv2-S parameters in bf16, 24 MB when their low mantissa bits are zero (`finetune_dinov2.py --mantissa-bits 5`).
- `data`: the four Fashion-MNIST IDX files, LZMA (26.4 MB for all 70,000 images). `--train-ranges 0:30000,...` keeps
  only those training images (the others are zero-filled, so indices and labels stay where they were) and records
  the ranges in `present.json`; `dinov2_experiment.py` refuses to read an image outside them.
- `unpack DIR --to DEST`: every pack in DIR: a teacher to `DEST/NAME.safetensors` (tensors checked against the
  pack's sha256), the data to `DEST/fashion-mnist/` (raw IDX files, what `fashion-mnist:DEST/fashion-mnist` reads).

A pack is written as `NAME.pack.000`, `NAME.pack.001`, ... of at most `--chunk-mib` (15) MiB each, so a pack made on
the GPU machine under $OUT comes back whole.

    python benchmarks/device_pack.py teacher dinov2-s14 --to .carry/dinov2 --name pretrained
    python benchmarks/device_pack.py data --to .carry/dinov2 --train-ranges 0:30000,50000:50512
    python benchmarks/device_pack.py unpack .carry/dinov2 --to /tmp/dinov2        # on the GPU machine
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

MAGIC = b"TMPACK1\n"
PIECE = 4 << 20  # bytes per independently compressed piece (pieces compress in parallel)
SMALL = 65536  # tensors with fewer values stay float32 under --dtype bf16
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
PRESENT = "present.json"
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"cannot pack {dtype} tensors (float32, float16 and bfloat16 only)")


def _compress(pieces: list[bytes], preset: int, workers: int) -> list[bytes]:
    with ThreadPoolExecutor(max_workers=workers) as pool:  # lzma releases the GIL while it works
        return list(pool.map(lambda b: lzma.compress(b, preset=preset), pieces))


def _streams_to_bytes(header: dict[str, Any], streams: dict[str, bytes], workers: int) -> bytes:
    """MAGIC, the header (with each stream's compressed piece sizes) as JSON, then the compressed pieces."""
    names = list(streams)
    jobs, owners = [], []
    for name in names:
        data = streams[name]
        for start in range(0, max(len(data), 1), PIECE):
            jobs.append(data[start : start + PIECE])
            owners.append(name)
    # The high bytes and the images compress a lot and gain from the slowest preset; the low bytes are near noise.
    presets = [6 if name.endswith(":lo") else 9 | lzma.PRESET_EXTREME for name in owners]
    compressed = [None] * len(jobs)
    for preset in set(presets):
        idx = [i for i, p in enumerate(presets) if p == preset]
        for i, blob in zip(idx, _compress([jobs[i] for i in idx], preset, workers), strict=True):
            compressed[i] = blob
    header = dict(header)
    header["order"] = names  # the pieces' order in the file (the JSON's keys are sorted)
    header["streams"] = {
        name: {
            "raw": len(streams[name]),
            "pieces": [len(c) for c, o in zip(compressed, owners, strict=True) if o == name],
        }
        for name in names
    }
    head = json.dumps(header, sort_keys=True).encode()
    return MAGIC + len(head).to_bytes(8, "little") + head + b"".join(compressed)


def _bytes_to_streams(blob: bytes, workers: int) -> tuple[dict[str, Any], dict[str, bytes]]:
    if not blob.startswith(MAGIC):
        raise ValueError("not a tmconvert device pack (bad magic)")
    size = int.from_bytes(blob[len(MAGIC) : len(MAGIC) + 8], "little")
    start = len(MAGIC) + 8
    header = json.loads(blob[start : start + size])
    offset = start + size
    jobs, owners = [], []
    for name in header["order"]:
        for n in header["streams"][name]["pieces"]:
            jobs.append(blob[offset : offset + n])
            owners.append(name)
            offset += n
    with ThreadPoolExecutor(max_workers=workers) as pool:
        raw = list(pool.map(lzma.decompress, jobs))
    streams = {name: b"".join(r for r, o in zip(raw, owners, strict=True) if o == name) for name in header["streams"]}
    for name, info in header["streams"].items():
        if len(streams[name]) != info["raw"]:
            raise ValueError(f"pack stream {name}: {len(streams[name])} bytes, expected {info['raw']}")
    return header, streams


def write_chunks(blob: bytes, folder: Path, name: str, chunk_mib: float) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(f"{name}.pack.*"):
        old.unlink()
    step = int(chunk_mib * 2**20)
    paths = []
    for i, start in enumerate(range(0, len(blob), step)):
        path = folder / f"{name}.pack.{i:03d}"
        path.write_bytes(blob[start : start + step])
        paths.append(path)
    return paths


def read_chunks(folder: Path, name: str) -> bytes:
    paths = sorted(folder.glob(f"{name}.pack.[0-9][0-9][0-9]"))
    if not paths or paths[-1].name != f"{name}.pack.{len(paths) - 1:03d}":
        raise ValueError(f"{folder}: pack {name} is incomplete ({[p.name for p in paths]})")
    return b"".join(p.read_bytes() for p in paths)


def pack_names(folder: Path) -> list[str]:
    return sorted({m[1] for p in folder.iterdir() if (m := re.fullmatch(r"(.+)\.pack\.\d{3}", p.name))})


# ---------------------------------------------------------------------------------------------------- tensors


def read_tensors(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata): a `.safetensors` file as stored, anything else through tmconvert's reader
    in canonical timm names."""
    if src.is_file() and src.suffix == ".safetensors":
        with safe_open(str(src), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    from tmconvert.converter.checkpoint import open_checkpoint

    with open_checkpoint(src) as ckpt:
        return ckpt.state_dict(), {"packed_from": src.name, "layout": str(ckpt.layout)}


def round_mantissa(tensor: torch.Tensor, bits: int) -> torch.Tensor:
    """`tensor` in bfloat16 keeping `bits` of its 7 mantissa bits, rounded to nearest (ties to even) once from float32
    (no double rounding); 7 is plain bfloat16."""
    if not 0 <= bits <= 7:
        raise ValueError(f"mantissa bits {bits}: bfloat16 has 0 to 7")
    x = tensor.detach().float().contiguous().view(torch.int32)
    shift = 16 + 7 - bits
    lsb = (x >> shift) & 1
    x = (x + ((1 << (shift - 1)) - 1) + lsb) & ~((1 << shift) - 1)
    return x.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def storage_precision(tensors: dict[str, torch.Tensor], mantissa_bits: int = 7) -> dict[str, torch.Tensor]:
    """The matrices (>= `SMALL` values) in bfloat16 with `mantissa_bits`, every other float tensor in float32."""
    return {
        k: round_mantissa(v, mantissa_bits) if v.numel() >= SMALL else v.float().contiguous()
        for k, v in tensors.items()
    }


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Of names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}|{_dtype_name(t.dtype)}|{list(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def pack_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], workers: int) -> bytes:
    entries, wide, narrow = [], [], []
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        group = narrow if t.element_size() == 2 else wide
        entries.append({"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape), "group": t.element_size()})
        group.append(raw)
    two = np.frombuffer(b"".join(narrow), dtype=np.uint8).reshape(-1, 2)
    streams = {
        "2:hi": two[:, 1].tobytes(),  # little-endian: byte 1 holds the sign and the exponent
        "2:lo": two[:, 0].tobytes(),
        "4": b"".join(wide),
    }
    header = {"kind": "safetensors", "tensors": entries, "metadata": metadata, "sha256": tensors_sha256(tensors)}
    return _streams_to_bytes(header, streams, workers)


def unpack_tensors(header: dict[str, Any], streams: dict[str, bytes]) -> dict[str, torch.Tensor]:
    two = np.empty((len(streams["2:hi"]), 2), dtype=np.uint8)
    two[:, 0] = np.frombuffer(streams["2:lo"], dtype=np.uint8)
    two[:, 1] = np.frombuffer(streams["2:hi"], dtype=np.uint8)
    buffers = {2: two.reshape(-1).tobytes(), 4: streams["4"]}
    offsets = {2: 0, 4: 0}
    tensors = {}
    for entry in header["tensors"]:
        dtype, shape, group = DTYPES[entry["dtype"]], entry["shape"], entry["group"]
        nbytes = int(np.prod(shape, dtype=np.int64)) * group
        raw = bytearray(buffers[group][offsets[group] : offsets[group] + nbytes])
        offsets[group] += nbytes
        tensors[entry["name"]] = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape).clone()
    if tensors_sha256(tensors) != header["sha256"]:
        raise ValueError("unpacked tensors do not match the pack's sha256")
    return tensors


# ---------------------------------------------------------------------------------------------------- data


def fashion_mnist_folder(root: str | None) -> Path:
    from tmconvert.converter.data.fashion_mnist import fashion_mnist_root

    return fashion_mnist_root(root)


def _read_idx_bytes(folder: Path, name: str) -> bytes:
    gz = folder / f"{name}.gz"
    return gzip.decompress(gz.read_bytes()) if gz.exists() else (folder / name).read_bytes()


def parse_ranges(text: str | None) -> list[tuple[int, int]] | None:
    if not text:
        return None
    ranges = []
    for item in text.split(","):
        start, _, stop = item.partition(":")
        ranges.append((int(start), int(stop)))
    return ranges


def pack_data(root: str | None, train_ranges: list[tuple[int, int]] | None, workers: int) -> bytes:
    folder = fashion_mnist_folder(root)
    streams = {name: _read_idx_bytes(folder, name) for name in IDX_FILES}
    if train_ranges is not None:
        images = bytearray(streams["train-images-idx3-ubyte"])
        count = int.from_bytes(images[4:8], "big")
        keep = np.zeros(count, dtype=bool)
        for start, stop in train_ranges:
            keep[start:stop] = True
        pixels = np.frombuffer(images, dtype=np.uint8, offset=16).reshape(count, -1).copy()
        pixels[~keep] = 0
        streams["train-images-idx3-ubyte"] = bytes(images[:16]) + pixels.tobytes()
    header = {"kind": "fashion-mnist", "train_ranges": train_ranges}
    return _streams_to_bytes(header, streams, workers)


def unpack_data(header: dict[str, Any], streams: dict[str, bytes], dest: Path) -> Path:
    folder = dest / "fashion-mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in streams.items():
        (folder / name).write_bytes(data)
    present = folder / PRESENT
    if header.get("train_ranges") is not None:
        present.write_text(json.dumps({"train": header["train_ranges"]}) + "\n")
    else:
        present.unlink(missing_ok=True)
    return folder


def check_present(root: str | Path | None, split: str, start: int, stop: int, what: str) -> None:
    """Refuse to read training images that a partial data pack left out (zero-filled)."""
    if root is None or split != "train":
        return
    present = Path(root) / PRESENT
    if not present.exists():
        return
    ranges = json.loads(present.read_text())["train"]
    if not any(a <= start and stop <= b for a, b in ranges):
        raise SystemExit(
            f"{what} reads training images {start}:{stop}, but {root} holds only {ranges} (a partial data pack); "
            "unpack the full pack (device_pack.py data without --train-ranges)"
        )


# ---------------------------------------------------------------------------------------------------- commands


def unpack(folder: Path, dest: Path, workers: int) -> dict[str, Path]:
    """Every pack in `folder` into `dest`; returns name -> what was written."""
    written = {}
    for name in pack_names(folder):
        header, streams = _bytes_to_streams(read_chunks(folder, name), workers)
        if header["kind"] == "safetensors":
            tensors = unpack_tensors(header, streams)
            path = dest / f"{name}.safetensors"
            dest.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata=header["metadata"] or None)
            os.replace(tmp, path)
        else:
            path = unpack_data(header, streams, dest)
        written[name] = path
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("teacher", help="pack a checkpoint")
    p.add_argument("source", type=Path)
    p.add_argument("--to", type=Path, required=True)
    p.add_argument("--name", default="teacher")
    p.add_argument("--dtype", choices=("bf16", "keep"), default="bf16")
    p.add_argument("--mantissa-bits", type=int, default=7, help="bf16 mantissa bits kept in the matrices (7: all)")
    p = sub.add_parser("data", help="pack Fashion-MNIST")
    p.add_argument("--root", default=None, help="folder of the IDX files (default: tmconvert's search)")
    p.add_argument("--to", type=Path, required=True)
    p.add_argument("--name", default="fashion-mnist")
    p.add_argument("--train-ranges", default=None, help="START:STOP,... training images to keep (default: all)")
    p = sub.add_parser("unpack", help="unpack every pack of a folder")
    p.add_argument("folder", type=Path)
    p.add_argument("--to", type=Path, required=True)
    for p in sub.choices.values():
        p.add_argument("--chunk-mib", type=float, default=15.0)
        p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if args.command == "unpack":
        for name, path in unpack(args.folder, args.to, args.threads).items():
            print(f"unpacked {name} -> {path}")
    else:
        if args.command == "teacher":
            tensors, metadata = read_tensors(args.source)
            if args.dtype == "bf16":
                tensors = storage_precision(tensors, args.mantissa_bits)
            blob = pack_tensors(tensors, metadata, args.threads)
        else:
            blob = pack_data(args.root, parse_ranges(args.train_ranges), args.threads)
        paths = write_chunks(blob, args.to, args.name, args.chunk_mib)
        print(f"packed {args.name}: {len(blob) / 1e6:.1f} MB in {', '.join(str(p) for p in paths)}")
    print(f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
