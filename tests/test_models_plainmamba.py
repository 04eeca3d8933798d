"""PlainMamba: upstream key/shape table and counts, zig-zag scans, an independent slow fp64 forward, init, geometry."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tmconvert.models import (
    ModelConfigError,
    PlainMamba,
    PlainMambaConfig,
    build_model,
    family_of,
    get_config,
    state_dict_shapes,
)
from tmconvert.models.plainmamba import DIRECTIONS, scan_plan

# --------------------------------------------------------------------------------------------------------------------
# (1) The state dict, written out from upstream's module definitions (ChenhongyiYang/PlainMamba@0a3aae7:
# plain_mamba.py, plain_mamba_layer.py, modules/patch_embed.py; mmcls ImageClassifier -> backbone / head.fc).


def bn(prefix: str, c: int) -> dict[str, tuple]:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def expected_table(D: int, depth: int, num_convs: int, dw_layers: tuple[int, ...], R: int) -> dict[str, tuple]:
    E, N = 2 * D, 16
    table: dict[str, tuple] = {"backbone.pos_embed": (1, 196, D)}  # a module's own parameters come first
    table["backbone.patch_embed.stem.0.weight"] = (64, 3, 7, 7)
    table.update(bn("backbone.patch_embed.stem.1", 64))
    for j in range(num_convs):  # Sequential of (conv, BN, ReLU) * num_convs
        table[f"backbone.patch_embed.convs.{3 * j}.weight"] = (64, 64, 3, 3)
        table.update(bn(f"backbone.patch_embed.convs.{3 * j + 1}", 64))
    table["backbone.patch_embed.projection.weight"] = (D, 64, 8, 8)
    table["backbone.patch_embed.projection.bias"] = (D,)
    for i in range(depth):
        p = f"backbone.layers.{i}"
        table[f"{p}.norm.weight"] = (D,)
        table[f"{p}.norm.bias"] = (D,)
        if i in dw_layers:
            table[f"{p}.dw.0.weight"] = (D, 1, 3, 3)
            table.update(bn(f"{p}.dw.1", D))
        table.update(
            {
                f"{p}.mamba.A_log": (E, N),
                f"{p}.mamba.D": (E,),
                f"{p}.mamba.direction_Bs": (5, N),
                f"{p}.mamba.in_proj.weight": (2 * E, D),
                f"{p}.mamba.in_proj.bias": (2 * E,),
                f"{p}.mamba.conv2d.weight": (E, 1, 7, 7),
                f"{p}.mamba.conv2d.bias": (E,),
                f"{p}.mamba.x_proj.weight": (R + 2 * N, E),
                f"{p}.mamba.dt_proj.weight": (E, R),
                f"{p}.mamba.dt_proj.bias": (E,),
                f"{p}.mamba.out_proj.weight": (D, E),
                f"{p}.mamba.out_proj.bias": (D,),
            }
        )
    table["backbone.ln1.weight"] = (D,)
    table["backbone.ln1.bias"] = (D,)
    table["head.fc.weight"] = (1000, D)
    table["head.fc.bias"] = (1000,)
    return table


@pytest.mark.parametrize(
    ("name", "D", "depth", "num_convs", "dw_layers", "R", "params", "keys", "readme_m"),
    [
        ("plainmamba-l1", 192, 24, 1, (0,), 12, 7_551_656, 361, 73),
        ("plainmamba-l2", 384, 24, 2, (), 24, 26_145_832, 361, 257),
        ("plainmamba-l3", 448, 36, 2, (), 28, 50_956_456, 529, 505),
    ],
)
def test_state_dict_table_and_param_count(name, D, depth, num_convs, dw_layers, R, params, keys, readme_m) -> None:
    model = build_model(name, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = expected_table(D, depth, num_convs, dw_layers, R)
    assert list(shapes.items()) == list(expected.items())  # keys, shapes and order
    assert len(shapes) == keys
    assert state_dict_shapes(get_config(name)) == shapes
    assert sum(p.numel() for p in model.parameters()) == params
    # upstream README's "#Params (M)" 7.3 / 25.7 / 50.5 count the backbone only, truncated to 0.1 M
    assert sum(p.numel() for p in model.backbone.parameters()) // 100_000 == readme_m
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_concrete_keys() -> None:
    l1 = list(state_dict_shapes(get_config("plainmamba-l1")).items())
    assert l1[:8] == [
        ("backbone.pos_embed", (1, 196, 192)),
        ("backbone.patch_embed.stem.0.weight", (64, 3, 7, 7)),
        ("backbone.patch_embed.stem.1.weight", (64,)),
        ("backbone.patch_embed.stem.1.bias", (64,)),
        ("backbone.patch_embed.stem.1.running_mean", (64,)),
        ("backbone.patch_embed.stem.1.running_var", (64,)),
        ("backbone.patch_embed.stem.1.num_batches_tracked", ()),
        ("backbone.patch_embed.convs.0.weight", (64, 64, 3, 3)),
    ]
    l1 = dict(l1)
    assert l1["backbone.layers.0.dw.0.weight"] == (192, 1, 3, 3) and "backbone.layers.1.dw.0.weight" not in l1
    assert l1["backbone.layers.23.mamba.x_proj.weight"] == (44, 384)
    assert l1["backbone.layers.5.mamba.in_proj.weight"] == (768, 192)
    l2 = state_dict_shapes(get_config("plainmamba-l2"))
    assert (
        l2["backbone.patch_embed.convs.3.weight"] == (64, 64, 3, 3) and "backbone.patch_embed.convs.6.weight" not in l2
    )
    assert l2["backbone.layers.7.mamba.dt_proj.weight"] == (768, 24)
    assert l2["backbone.layers.0.mamba.direction_Bs"] == (5, 16)
    assert not any(".dw." in k for k in l2)
    assert state_dict_shapes(get_config("plainmamba-l3"))["backbone.layers.35.mamba.x_proj.weight"] == (60, 896)


def test_registered_configs() -> None:
    for name, (dim, depth, convs, dw) in {
        "plainmamba-l1": (192, 24, 1, (0,)),
        "plainmamba-l2": (384, 24, 2, ()),
        "plainmamba-l3": (448, 36, 2, ()),
    }.items():
        cfg = get_config(name)
        assert family_of(cfg) == "plainmamba"
        assert (cfg.embed_dim, cfg.depth, cfg.num_convs, cfg.dwconv_layers) == (dim, depth, convs, dw)
        assert (cfg.d_state, cfg.expand, cfg.conv_size, cfg.resolved_dt_rank) == (16, 2, 7, math.ceil(dim / 16))
        assert (cfg.patch_size, cfg.img_size, cfg.grid, cfg.seq_len) == (16, (224, 224), (14, 14), 196)
        assert (cfg.norm_eps, cfg.final_norm_eps, cfg.num_classes, cfg.dt_init) == (1e-5, 1e-6, 1000, "mmcls")


# --------------------------------------------------------------------------------------------------------------------
# (2) Zig-zag scans. Codes: 0 start, 1 right, 2 left, 3 up, 4 down (the move arriving at the step).

SCANS = {
    (3, 4): {
        "row": ((0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11), (0, 1, 1, 1, 4, 2, 2, 2, 4, 1, 1, 1)),
        "row_rev": ((11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0), (0, 2, 2, 2, 3, 1, 1, 1, 3, 2, 2, 2)),
        "col": ((0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3), (0, 4, 4, 1, 3, 3, 1, 4, 4, 1, 3, 3)),
        "col_rev": ((3, 7, 11, 10, 6, 2, 1, 5, 9, 8, 4, 0), (0, 4, 4, 2, 3, 3, 2, 4, 4, 2, 3, 3)),
    },
    (2, 3): {
        "row": ((0, 1, 2, 5, 4, 3), (0, 1, 1, 4, 2, 2)),
        "row_rev": ((3, 4, 5, 2, 1, 0), (0, 1, 1, 3, 2, 2)),
        "col": ((0, 3, 4, 1, 2, 5), (0, 4, 1, 3, 1, 4)),
        "col_rev": ((5, 2, 1, 4, 3, 0), (0, 3, 2, 4, 2, 3)),
    },
    (3, 3): {
        "row": ((0, 1, 2, 5, 4, 3, 6, 7, 8), (0, 1, 1, 4, 2, 2, 4, 1, 1)),
        "row_rev": ((8, 7, 6, 3, 4, 5, 2, 1, 0), (0, 2, 2, 3, 1, 1, 3, 2, 2)),
        "col": ((0, 3, 6, 7, 4, 1, 2, 5, 8), (0, 4, 4, 1, 3, 3, 1, 4, 4)),
        "col_rev": ((8, 5, 2, 1, 4, 7, 6, 3, 0), (0, 3, 3, 2, 4, 4, 2, 3, 3)),
    },
}


@pytest.mark.parametrize("grid", list(SCANS))
def test_scan_orders_and_codes_written_out(grid: tuple[int, int]) -> None:
    plan = scan_plan(grid, torch.device("cpu"))
    for k, name in enumerate(DIRECTIONS):
        order, codes = SCANS[grid][name]
        assert tuple(plan.orders[k].tolist()) == order, name
        assert tuple(plan.codes[k].tolist()) == codes, name
        assert torch.equal(plan.orders[k][plan.inverse[k]], torch.arange(grid[0] * grid[1]))


@pytest.mark.parametrize("grid", [(1, 1), (1, 5), (5, 1), (4, 4), (5, 6), (7, 3), (14, 14)])
def test_scan_orders_are_zigzag_walks(grid: tuple[int, int]) -> None:
    h, w = grid
    plan = scan_plan(grid, torch.device("cpu"))
    orders, codes = plan.orders, plan.codes
    assert orders.shape == codes.shape == (4, h * w)
    for k in range(4):
        assert sorted(orders[k].tolist()) == list(range(h * w))  # a permutation
        assert codes[k, 0] == 0
        cells = [divmod(t, w) for t in orders[k].tolist()]
        for j in range(1, h * w):
            move = (cells[j][0] - cells[j - 1][0], cells[j][1] - cells[j - 1][1])
            assert move in {(0, 1), (0, -1), (-1, 0), (1, 0)}  # neighbours: a walk
            assert codes[k, j] == {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}[move]
    assert torch.equal(orders[1], orders[0].flip(0)) and torch.equal(orders[3], orders[2].flip(0))
    assert orders[0, 0] == 0 and orders[2, 0] == 0 and orders[0, min(w, h * w) - 1] == w - 1
    assert orders[2, h - 1] == (h - 1) * w  # column scan goes down column 0 first


def test_model_scan_orders() -> None:
    model = PlainMamba(tiny(), device="meta")
    orders = model.scan_orders()
    assert list(orders) == ["row", "row_rev", "col", "col_rev"]
    assert tuple(orders["col"].tolist()) == SCANS[(3, 4)]["col"][0]  # tiny()'s grid is 3 x 4
    assert tuple(model.scan_orders(grid=(2, 3))["col_rev"].tolist()) == SCANS[(2, 3)]["col_rev"][0]
    orders["row"][0] = 99  # callers get copies, never the cached plan
    assert model.scan_orders()["row"][0] == 0
    layout = model.token_layout()
    assert layout.grid == (3, 4) and layout.cls_index is None and layout.patch_indices == tuple(range(12))


# --------------------------------------------------------------------------------------------------------------------
# (3) An independent slow implementation: explicit loops in float64, upstream's quirks spelled out.


def snake(h: int, w: int, by_rows: bool) -> list[tuple[int, int]]:
    """Walk the grid boustrophedon from (0, 0), one row (column) at a time."""
    cells = []
    for outer in range(h if by_rows else w):
        inner = range(w if by_rows else h)
        for step in inner if outer % 2 == 0 else reversed(inner):
            cells.append((outer, step) if by_rows else (step, outer))
    return cells


def ref_scans(h: int, w: int) -> list[tuple[list[int], list[int]]]:
    moves = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}
    out = []
    for cells in (snake(h, w, True), snake(h, w, True)[::-1], snake(h, w, False), snake(h, w, False)[::-1]):
        codes = [0] + [moves[(b[0] - a[0], b[1] - a[1])] for a, b in itertools.pairwise(cells)]
        out.append(([r * w + c for r, c in cells], codes))
    return out


def ref_mixer(p: dict[str, torch.Tensor], x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, list]:
    """PlainMamba2D.forward as upstream computes it; returns the output and each direction's y in scan order."""
    batch, length, _ = x.shape
    h, w = grid
    e = p["D"].shape[0]
    n = p["A_log"].shape[1]
    r = p["dt_proj.weight"].shape[1]
    xz = x @ p["in_proj.weight"].T + p["in_proj.bias"]
    xs, z = xz[..., :e], xz[..., e:]
    k = p["conv2d.weight"].shape[-1]
    img = F.pad(xs.reshape(batch, h, w, e), (0, 0, k // 2, k // 2, k // 2, k // 2))
    conv = p["conv2d.bias"].expand(batch, h, w, e).clone()
    for di in range(k):
        for dj in range(k):
            conv = conv + p["conv2d.weight"][:, 0, di, dj] * img[:, di : di + h, dj : dj + w]
    u = (conv * torch.sigmoid(conv)).reshape(batch, length, e)  # raster order
    dbl = u @ p["x_proj.weight"].T
    dt_in, b_mat, c_mat = dbl[..., :r], dbl[..., r : r + n], dbl[..., r + n :]
    bias = p["dt_proj.bias"]
    delta = torch.log1p(torch.exp(dt_in @ p["dt_proj.weight"].T + bias + bias))  # the bias twice (upstream)
    a = -torch.exp(p["A_log"])
    y_tokens = torch.zeros(batch, length, e, dtype=x.dtype)
    per_direction = []
    for order, codes in ref_scans(h, w):
        state = torch.zeros(batch, e, n, dtype=x.dtype)
        ys = torch.zeros(batch, length, e, dtype=x.dtype)
        for j in range(length):
            t = order[j]
            dt = delta[:, j, :, None]  # dt, B and C of raster token j, whatever token step j visits
            b_j = b_mat[:, j] + p["direction_Bs"][codes[j]]
            state = torch.exp(dt * a) * state + dt * b_j[:, None, :] * u[:, t, :, None]
            ys[:, j] = (state * c_mat[:, j, None, :]).sum(-1) + p["D"] * u[:, t]
            y_tokens[:, t] += ys[:, j]
        per_direction.append(ys)
    out = (y_tokens * (z * torch.sigmoid(z))) @ p["out_proj.weight"].T + p["out_proj.bias"]
    return out, per_direction


def ref_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_bn(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """Eval-mode BatchNorm2d (running statistics, eps 1e-5)."""
    shape = (1, -1, 1, 1)
    mean, var = sd[f"{prefix}.running_mean"].view(shape), sd[f"{prefix}.running_var"].view(shape)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{prefix}.weight"].view(shape) + sd[f"{prefix}.bias"].view(shape)


def ref_model(sd: dict[str, torch.Tensor], cfg: PlainMambaConfig, images: torch.Tensor) -> dict:
    """Upstream ImageClassifier in eval mode: ConvPatchEmbed, pos_embed (bicubic-resized if needed), layers, mean."""
    pe = "backbone.patch_embed"
    x = torch.relu(ref_bn(F.conv2d(images, sd[f"{pe}.stem.0.weight"], stride=2, padding=3), sd, f"{pe}.stem.1"))
    for j in range(cfg.num_convs):
        x = F.conv2d(x, sd[f"{pe}.convs.{3 * j}.weight"], padding=1)
        x = torch.relu(ref_bn(x, sd, f"{pe}.convs.{3 * j + 1}"))
    s = cfg.patch_size // 2
    rows, cols = math.ceil(x.shape[2] / s), math.ceil(x.shape[3] / s)
    x = F.pad(x, (0, cols * s - x.shape[3], 0, rows * s - x.shape[2]))  # mmcv AdaptivePadding "corner"
    x = F.conv2d(x, sd[f"{pe}.projection.weight"], sd[f"{pe}.projection.bias"], stride=s)
    x = x.flatten(2).transpose(1, 2)
    pos = sd["backbone.pos_embed"]
    if (rows, cols) != cfg.grid:  # mmcls resize_pos_embed, in fp32 (the dtype of upstream's parameters)
        grid_pos = pos.float().reshape(1, *cfg.grid, -1).permute(0, 3, 1, 2)
        grid_pos = F.interpolate(grid_pos, size=(rows, cols), mode="bicubic", align_corners=False)
        pos = grid_pos.flatten(2).transpose(1, 2).to(pos.dtype)
    x = x + pos
    layers, directions = [], []
    d = cfg.embed_dim
    for i in range(cfg.depth):
        lp = f"backbone.layers.{i}"
        p = {k[len(f"{lp}.mamba.") :]: v for k, v in sd.items() if k.startswith(f"{lp}.mamba.")}
        mixed, per_direction = ref_mixer(
            p, ref_layernorm(x, sd[f"{lp}.norm.weight"], sd[f"{lp}.norm.bias"], 1e-5), (rows, cols)
        )
        x = x + mixed
        if i in cfg.dwconv_layers:
            img = x.transpose(1, 2).reshape(x.shape[0], d, rows, cols)
            img = F.gelu(ref_bn(F.conv2d(img, sd[f"{lp}.dw.0.weight"], padding=1, groups=d), sd, f"{lp}.dw.1"))
            x = img.flatten(2).transpose(1, 2)
        layers.append(x)
        directions.append(dict(zip(DIRECTIONS, per_direction, strict=True)))
    final = ref_layernorm(x, sd["backbone.ln1.weight"], sd["backbone.ln1.bias"], 1e-6)
    logits = final.mean(1) @ sd["head.fc.weight"].T + sd["head.fc.bias"]
    return {"logits": logits, "final": final, "layers": layers, "directions": directions}


def tiny(**overrides) -> PlainMambaConfig:
    """A 3 x 4 grid through corner padding (stem 11 x 14, projection step 4), a dw layer, small stem and state."""
    fields = {
        "embed_dim": 16,
        "depth": 2,
        "num_convs": 1,
        "dwconv_layers": (1,),
        "d_state": 4,
        "patch_size": 8,
        "img_size": (22, 28),
        "stem_channels": 8,
        "num_classes": 10,
    }
    return PlainMambaConfig(**{**fields, **overrides})


def randomized_fp64(cfg: PlainMambaConfig, seed: int = 0) -> PlainMamba:
    """Upstream init plus noise on every parameter and BN statistic, so every term matters; eval mode."""
    model = PlainMamba(cfg, seed=seed, dtype=torch.float64).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
            elif t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.1)
    return model


def images_for(size: tuple[int, int], batch: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(7), dtype=dtype)


TOL = {"atol": 1e-10, "rtol": 1e-10}


def test_mixer_matches_loop_reference() -> None:
    cfg = tiny()
    mixer = randomized_fp64(cfg).backbone.layers[0].mamba
    grid = (3, 5)  # any grid: the mixer takes it from the caller
    x = torch.randn(2, 15, cfg.embed_dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        out, directions = mixer(x, grid, scan_plan(grid, x.device), return_directions=True)
        ref, ref_directions = ref_mixer({k: v for k, v in mixer.state_dict().items()}, x, grid)
    torch.testing.assert_close(out, ref, **TOL)
    for name, ref_y in zip(DIRECTIONS, ref_directions, strict=True):
        torch.testing.assert_close(directions[name], ref_y, **TOL)
    assert directions["row"].shape == (2, 15, cfg.d_inner)


@pytest.mark.parametrize("size", [(22, 28), (30, 37)])  # the config's grid; a 4 x 5 grid with pos_embed resampled
def test_forward_matches_independent_reference(size: tuple[int, int]) -> None:
    cfg = tiny()
    model = randomized_fp64(cfg)
    images = images_for(size)
    with torch.no_grad():
        out = model.forward_all(images, return_directions=True)
        ref = ref_model(model.state_dict(), cfg, images)
        logits = model(images)
    torch.testing.assert_close(out.logits, ref["logits"], **TOL)
    torch.testing.assert_close(logits, ref["logits"], **TOL)
    torch.testing.assert_close(out.final_tokens, ref["final"], **TOL)
    for i in range(cfg.depth):
        torch.testing.assert_close(out.layer_tokens[i], ref["layers"][i], **TOL)
        for name in DIRECTIONS:
            torch.testing.assert_close(out.directions[i][name], ref["directions"][i][name], **TOL)
    length = ref["final"].shape[1]
    assert length == (12 if size == (22, 28) else 20)
    assert out.logits.shape == (2, 10) and out.final_tokens.shape == (2, length, 16)
    assert len(out.layer_tokens) == 2 and out.directions[1]["col_rev"].shape == (2, length, 32)


def test_directions_permuted_back_give_the_layer_output() -> None:
    """directions[name][:, j] belongs to token scan_orders()[name][j]: scattered back, summed, gated, projected."""
    cfg = tiny()
    model = PlainMamba(cfg, seed=0).eval()
    images = images_for(cfg.img_size, dtype=torch.float32)
    orders = model.scan_orders()
    with torch.no_grad():
        out = model.forward_all(images, return_directions=True)
        x0, _ = model.backbone.embed(images)
        layer = model.backbone.layers[0]
        z = layer.mamba.in_proj(layer.norm(x0))[..., cfg.d_inner :]
        summed = torch.zeros_like(out.directions[0]["row"])
        for name in DIRECTIONS:
            summed[:, orders[name]] += out.directions[0][name]
        expected = x0 + layer.mamba.out_proj(summed * F.silu(z))
        torch.testing.assert_close(out.layer_tokens[0], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.final_tokens, model.backbone.ln1(out.layer_tokens[-1]))
        torch.testing.assert_close(model(images), out.logits)
        assert model.forward_all(images).directions is None


def test_gradients_reach_every_parameter() -> None:
    cfg = tiny()
    model = PlainMamba(cfg, seed=0)
    loss = F.cross_entropy(model(images_for(cfg.img_size, dtype=torch.float32)), torch.tensor([1, 2]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert (model.backbone.layers[0].mamba.direction_Bs.grad.abs().sum(-1) > 0).all()  # all five codes occur


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_forward_matches_cpu() -> None:
    cfg = tiny(embed_dim=32, d_state=16)
    model = PlainMamba(cfg, seed=0).eval()
    images = images_for(cfg.img_size, dtype=torch.float32)
    with torch.no_grad():
        cpu = model.forward_all(images, return_directions=True)
        gpu = model.cuda().forward_all(images.cuda(), return_directions=True)
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(gpu.directions[1]["col"].cpu(), cpu.directions[1]["col"], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------------------------------
# (4) Initialisation


def test_init_follows_upstream() -> None:
    cfg = dataclasses.replace(get_config("plainmamba-l1"), depth=2)
    model = PlainMamba(cfg, seed=0)
    e, n = cfg.d_inner, cfg.d_state
    log_n = torch.log(torch.arange(1, n + 1, dtype=torch.float32))
    for layer in model.backbone.layers:
        m = layer.mamba
        torch.testing.assert_close(m.A_log, log_n.expand(e, n), rtol=0, atol=0)
        assert torch.equal(m.D, torch.ones(e))
        for linear in (m.in_proj, m.out_proj, m.x_proj, m.dt_proj):  # mmcls TruncNormal(Linear, 0.02), bias 0
            assert abs(linear.weight.std().item() - 0.02) < 0.002, linear
            assert linear.bias is None or torch.equal(linear.bias, torch.zeros_like(linear.bias))
        assert 0 < m.direction_Bs.abs().max() < 0.1
        bound = 1 / 7  # depthwise 7x7 conv: PyTorch default, fan_in 49
        assert m.conv2d.weight.abs().max() <= bound and m.conv2d.weight.abs().max() > 0.9 * bound
        assert m.conv2d.bias.abs().max() <= bound and m.conv2d.bias.abs().sum() > 0
        assert torch.equal(layer.norm.weight, torch.ones(192)) and torch.equal(layer.norm.bias, torch.zeros(192))
    dw_bn = model.backbone.layers[0].dw[1]
    assert torch.equal(dw_bn.weight, torch.ones(192)) and torch.equal(dw_bn.running_var, torch.ones(192))
    assert abs(model.head.fc.weight.std().item() - 0.01) < 0.001 and torch.equal(model.head.fc.bias, torch.zeros(1000))
    assert abs(model.backbone.pos_embed.std().item() - 0.02) < 0.002
    stem = model.backbone.patch_embed.stem[0].weight
    assert stem.abs().max() <= 1 / math.sqrt(3 * 49) and stem.abs().max() > 0.9 / math.sqrt(3 * 49)
    proj_bias = model.backbone.patch_embed.projection.bias
    assert proj_bias.abs().max() <= 1 / math.sqrt(64 * 64) and proj_bias.abs().sum() > 0
    assert torch.equal(model.backbone.ln1.weight, torch.ones(192))


def test_mamba_dt_init() -> None:
    cfg = dataclasses.replace(get_config("plainmamba-l2"), depth=1, dt_init="mamba")
    dt_proj = PlainMamba(cfg, seed=0).backbone.layers[0].mamba.dt_proj
    r = cfg.resolved_dt_rank
    assert dt_proj.weight.abs().max() <= r**-0.5 and dt_proj.weight.abs().max() > 0.9 * r**-0.5
    dt = F.softplus(dt_proj.bias)
    assert dt.min() >= cfg.dt_min * (1 - 1e-5) and dt.max() <= cfg.dt_max * (1 + 1e-5)
    assert abs(dt.log().mean().item() - (math.log(cfg.dt_min) + math.log(cfg.dt_max)) / 2) < 0.3  # log-uniform


def test_init_is_seeded() -> None:
    cfg = tiny()
    a, b, c = PlainMamba(cfg, seed=5), PlainMamba(cfg, seed=5), PlainMamba(cfg, seed=6)
    from_generator = PlainMamba(cfg, seed=torch.Generator().manual_seed(5))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
        assert torch.equal(value, from_generator.state_dict()[key]), key
    for key in ("backbone.pos_embed", "backbone.layers.0.mamba.direction_Bs", "backbone.layers.1.mamba.in_proj.weight"):
        assert not torch.equal(a.state_dict()[key], c.state_dict()[key]), key


def test_no_weight_decay_names() -> None:
    names = PlainMamba(tiny(), device="meta").no_weight_decay()
    assert names == {"backbone.pos_embed"} | {
        f"backbone.layers.{i}.mamba.{p}" for i in range(2) for p in ("A_log", "D", "direction_Bs")
    }


# --------------------------------------------------------------------------------------------------------------------
# (5) Loading, geometry, config validation, the registry


def test_state_dict_loads_strictly_both_ways() -> None:
    cfg = tiny()
    source, target = PlainMamba(cfg, seed=1).eval(), PlainMamba(cfg, seed=2).eval()
    target.load_state_dict(source.state_dict(), strict=True)
    images = images_for(cfg.img_size, dtype=torch.float32)
    torch.testing.assert_close(target(images), source(images), rtol=0, atol=0)
    skeleton = PlainMamba(cfg, device="meta")  # how the converter rebuilds a model from a file
    skeleton.load_state_dict(source.state_dict(), strict=True, assign=True)
    torch.testing.assert_close(skeleton.eval()(images), source(images), rtol=0, atol=0)


def test_geometry_follows_the_teacher() -> None:
    cfg = dataclasses.replace(get_config("plainmamba-l1"), img_size=112, patch_size=14, in_chans=1, num_classes=10)
    assert cfg.grid == (8, 8) and cfg.token_layout().seq_len == 64  # ViT-S/14 at 112 px
    shapes = state_dict_shapes(cfg)
    assert shapes["backbone.patch_embed.projection.weight"] == (192, 64, 7, 7)
    assert shapes["backbone.patch_embed.stem.0.weight"] == (64, 1, 7, 7)
    assert shapes["backbone.pos_embed"] == (1, 64, 192) and shapes["head.fc.weight"] == (10, 192)
    assert dataclasses.replace(cfg, img_size=(96, 160), patch_size=16).grid == (6, 10)
    # upstream sizes pos_embed from img_size // 2; corner padding covers a remainder
    assert dataclasses.replace(cfg, img_size=(100, 36), patch_size=16).grid == (7, 3)


def test_build_model_and_json_round_trip() -> None:
    model = build_model("plainmamba-l1", num_classes=10, img_size=32, depth=2, seed=0)
    assert isinstance(model, PlainMamba) and model.cfg.grid == (2, 2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    headless = build_model("plainmamba-l2", num_classes=0, device="meta")
    assert not any(k.startswith("head.") for k in headless.state_dict())
    cfg = get_config("plainmamba-l1")
    as_json = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    assert PlainMambaConfig(**as_json) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"patch_size": 15}, "patch_size must be even"),
        ({"embed_dim": 0}, "embed_dim must be positive"),
        ({"conv_size": 6}, "conv_size must be odd"),
        ({"dt_rank": 0}, "dt_rank must be positive or None"),
        ({"num_convs": -1}, "num_convs and num_classes must be >= 0"),
        ({"dwconv_layers": (24,)}, r"dwconv_layers must be distinct layer indices in \[0, 24\)"),
        ({"dwconv_layers": (0, 0)}, "dwconv_layers must be distinct"),
        ({"img_size": 1}, "img_size must be two sides of at least 2 px"),
        ({"dt_init": "constant"}, r"dt_init must be one of \('mmcls', 'mamba'\)"),
        ({"dt_min": 0.2}, "need 0 < dt_min <= dt_max"),
        ({"drop_path_rate": 1.0}, r"drop_path_rate must be in \[0, 1\)"),
    ],
)
def test_invalid_configs(overrides: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        dataclasses.replace(get_config("plainmamba-l1"), **overrides)
    with pytest.raises(ModelConfigError, match=message):
        build_model("plainmamba-l1", device="meta", **overrides)


def test_scan_plan_first_built_under_inference_mode_still_trains() -> None:
    """The plan is cached: one first built by an inference-mode pass must still be usable with autograd."""
    model = PlainMamba(tiny(), seed=0)
    images = images_for((38, 46), dtype=torch.float32)  # a 5 x 6 grid no other test uses
    with torch.inference_mode():
        model(images)
    model(images).sum().backward()
    assert model.backbone.layers[0].mamba.direction_Bs.grad is not None
