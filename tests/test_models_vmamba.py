"""VMamba v2: upstream key/shape table and counts, cross-scan/merge, an independent slow fp64 SS2D, hooks, init."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import tmconvert.models.vmamba  # noqa: F401  (registers the family)
from tmconvert.models import ModelConfigError, build_model, family_of, get_config, state_dict_shapes
from tmconvert.models.vmamba import (
    DIRECTIONS,
    SS2D,
    VMamba,
    VMambaConfig,
    cross_merge,
    cross_scan,
    scan_orders,
    stage_grids,
)

# --------------------------------------------------------------------------------------------------------------------
# (1) The state dict, written out from upstream's module definitions (MzeroMiko/VMamba@2ed52ea
# classification/models/vmamba.py: VSSM with patchembed v2, downsample v3, ln2d; VSSBlock; SS2D __initv2__ with
# forward_type v05_noz, initialize v0; classifier Sequential(norm, permute, avgpool, flatten, head)).


def expected_table(dims, depths, ratio, n=1, classes=1000, in_chans=3) -> dict[str, tuple]:
    table: dict[str, tuple] = {}
    d0 = dims[0]
    # _make_patch_embed_v2 (channel_first): conv, Identity, LN2d, Identity, GELU, conv, Identity, LN2d
    table.update({"patch_embed.0.weight": (d0 // 2, in_chans, 3, 3), "patch_embed.0.bias": (d0 // 2,)})
    table.update({"patch_embed.2.weight": (d0 // 2,), "patch_embed.2.bias": (d0 // 2,)})
    table.update({"patch_embed.5.weight": (d0, d0 // 2, 3, 3), "patch_embed.5.bias": (d0,)})
    table.update({"patch_embed.7.weight": (d0,), "patch_embed.7.bias": (d0,)})
    for s, (d, depth) in enumerate(zip(dims, depths, strict=True)):
        e, r = int(ratio * d), math.ceil(d / 16)
        for j in range(depth):
            p = f"layers.{s}.blocks.{j}"
            table.update({f"{p}.norm.weight": (d,), f"{p}.norm.bias": (d,)})
            # SS2D: own Parameters (x_proj_weight, then init_dt_A_D's A_logs, Ds, dt_projs_*), then out_norm (set by
            # get_outnorm before in_proj), in_proj (Linear2d, no bias), conv2d (no bias), out_proj
            table.update(
                {
                    f"{p}.op.x_proj_weight": (4, r + 2 * n, e),
                    f"{p}.op.A_logs": (4 * e, n),
                    f"{p}.op.Ds": (4 * e,),
                    f"{p}.op.dt_projs_weight": (4, e, r),
                    f"{p}.op.dt_projs_bias": (4, e),
                    f"{p}.op.out_norm.weight": (e,),
                    f"{p}.op.out_norm.bias": (e,),
                    f"{p}.op.in_proj.weight": (e, d),
                    f"{p}.op.conv2d.weight": (e, 1, 3, 3),
                    f"{p}.op.out_proj.weight": (d, e),
                    f"{p}.norm2.weight": (d,),
                    f"{p}.norm2.bias": (d,),
                    f"{p}.mlp.fc1.weight": (4 * d, d),
                    f"{p}.mlp.fc1.bias": (4 * d,),
                    f"{p}.mlp.fc2.weight": (d, 4 * d),
                    f"{p}.mlp.fc2.bias": (d,),
                }
            )
        if s < len(dims) - 1:  # _make_downsample_v3: Identity, conv 3x3/2, Identity, LN2d
            nd = dims[s + 1]
            table.update({f"layers.{s}.downsample.1.weight": (nd, d, 3, 3), f"layers.{s}.downsample.1.bias": (nd,)})
            table.update({f"layers.{s}.downsample.3.weight": (nd,), f"layers.{s}.downsample.3.bias": (nd,)})
    c = dims[-1]
    table.update({"classifier.norm.weight": (c,), "classifier.norm.bias": (c,)})
    table.update({"classifier.head.weight": (classes, c), "classifier.head.bias": (classes,)})
    return table


def formula_params(dims, depths, ratio, n=1, classes=1000) -> int:
    """Parameter count by hand from upstream's modules (independent of the table above)."""
    d0 = dims[0]
    total = (d0 // 2) * 27 + d0 // 2 + 2 * (d0 // 2) + d0 * (d0 // 2) * 9 + d0 + 2 * d0
    for s, (d, depth) in enumerate(zip(dims, depths, strict=True)):
        e, r = int(ratio * d), math.ceil(d / 16)
        ssm = e * d + 9 * e + 4 * (r + 2 * n) * e + 4 * e * r + 4 * e + 4 * e * n + 4 * e + 2 * e + d * e
        block = 2 * d + ssm + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
        total += depth * block
        if s < len(dims) - 1:
            total += dims[s + 1] * d * 9 + dims[s + 1] + 2 * dims[s + 1]
    c = dims[-1]
    return total + 2 * c + classes * c + classes


UPSTREAM = {
    # name: dims, depths, ssm_ratio, exact parameters, published (M, README / yaml names vmambav2v_tiny_224,
    # vmambav2_small_224, vmambav2_base_224), key count
    "vmamba-t": ((96, 192, 384, 768), (2, 2, 8, 2), 1.0, 30_249_064, 30.2, 276),
    "vmamba-s": ((96, 192, 384, 768), (2, 2, 15, 2), 2.0, 50_147_752, 50.1, 402),
    "vmamba-b": ((128, 256, 512, 1024), (2, 2, 15, 2), 2.0, 88_557_800, 88.6, 402),
}


@pytest.mark.parametrize("name", list(UPSTREAM))
def test_state_dict_table_and_param_count(name: str) -> None:
    dims, depths, ratio, params, published, keys = UPSTREAM[name]
    model = build_model(name, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes.items()) == list(expected_table(dims, depths, ratio).items())  # keys, shapes and order
    assert len(shapes) == keys
    assert state_dict_shapes(get_config(name)) == shapes
    count = sum(p.numel() for p in model.parameters())
    assert count == params == formula_params(dims, depths, ratio)
    assert round(count / 1e6, 1) == published
    assert all(t.device.type == "meta" for t in model.state_dict().values())


def test_concrete_keys_of_t() -> None:
    t = list(state_dict_shapes(get_config("vmamba-t")).items())
    assert t[:12] == [
        ("patch_embed.0.weight", (48, 3, 3, 3)),
        ("patch_embed.0.bias", (48,)),
        ("patch_embed.2.weight", (48,)),
        ("patch_embed.2.bias", (48,)),
        ("patch_embed.5.weight", (96, 48, 3, 3)),
        ("patch_embed.5.bias", (96,)),
        ("patch_embed.7.weight", (96,)),
        ("patch_embed.7.bias", (96,)),
        ("layers.0.blocks.0.norm.weight", (96,)),
        ("layers.0.blocks.0.norm.bias", (96,)),
        ("layers.0.blocks.0.op.x_proj_weight", (4, 8, 96)),  # R = 6, N = 1, E = 96 (ssm_ratio 1)
        ("layers.0.blocks.0.op.A_logs", (384, 1)),
    ]
    assert t[-4:] == [
        ("classifier.norm.weight", (768,)),
        ("classifier.norm.bias", (768,)),
        ("classifier.head.weight", (1000, 768)),
        ("classifier.head.bias", (1000,)),
    ]
    t = dict(t)
    assert t["layers.2.blocks.7.op.dt_projs_weight"] == (4, 384, 24)
    assert t["layers.2.blocks.7.op.in_proj.weight"] == (384, 384)
    assert t["layers.3.blocks.1.op.conv2d.weight"] == (768, 1, 3, 3)
    assert t["layers.3.blocks.1.mlp.fc1.weight"] == (3072, 768)
    assert t["layers.2.downsample.1.weight"] == (768, 384, 3, 3)
    assert t["layers.0.downsample.3.bias"] == (192,)
    assert not any(k.startswith("layers.3.downsample") for k in t)  # the last stage's downsample is an Identity
    assert "layers.2.blocks.8.norm.weight" not in t
    no_bias = ("op.in_proj.bias", "op.conv2d.bias", "op.out_proj.bias")
    assert not any(k.endswith(no_bias) for k in t)  # bias=False, ssm_conv_bias false
    s = state_dict_shapes(get_config("vmamba-s"))
    assert s["layers.2.blocks.14.op.x_proj_weight"] == (4, 24 + 2, 768) and s["layers.2.blocks.14.op.Ds"] == (3072,)
    b = state_dict_shapes(get_config("vmamba-b"))
    assert b["layers.3.blocks.1.op.dt_projs_weight"] == (4, 2048, 64) and b["patch_embed.0.weight"] == (64, 3, 3, 3)


def test_registered_configs() -> None:
    for name, (dims, depths, ratio, *_rest) in UPSTREAM.items():
        cfg = get_config(name)
        assert family_of(cfg) == "vmamba"
        assert (cfg.dims, cfg.depths, cfg.ssm_ratio, cfg.d_state, cfg.mlp_ratio) == (dims, depths, ratio, 1, 4.0)
        assert (cfg.patch_size, cfg.img_size, cfg.d_conv, cfg.norm_eps) == (4, (224, 224), 3, 1e-5)
        assert (cfg.num_classes, cfg.drop_path_rate, cfg.dt_rank) == (1000, 0.0, None)
        assert cfg.stage_grids() == [(56, 56), (28, 28), (14, 14), (7, 7)]
        assert [cfg.resolved_dt_rank(s) for s in range(4)] == [math.ceil(d / 16) for d in dims]
    assert len(get_config("vmamba-s").block_stages()) == 21
    assert get_config("vmamba-t").block_stages() == [0, 0, 1, 1] + [2] * 8 + [3, 3]


# --------------------------------------------------------------------------------------------------------------------
# (2) Cross-scan and merge


def test_scan_orders_written_out() -> None:
    orders = scan_orders((2, 3))  # tokens 0 1 2 / 3 4 5
    assert list(orders) == ["row", "col", "row_rev", "col_rev"] == list(DIRECTIONS)
    assert orders["row"].tolist() == [0, 1, 2, 3, 4, 5]
    assert orders["col"].tolist() == [0, 3, 1, 4, 2, 5]
    assert orders["row_rev"].tolist() == [5, 4, 3, 2, 1, 0]
    assert orders["col_rev"].tolist() == [5, 2, 4, 1, 3, 0]


@pytest.mark.parametrize("grid", [(1, 1), (2, 3), (3, 2), (4, 4), (5, 7)])
def test_cross_scan_follows_scan_orders_and_merge_inverts(grid: tuple[int, int]) -> None:
    h, w = grid
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    xs = cross_scan(x)
    assert xs.shape == (2, 4, 3, h * w)
    flat = x.flatten(2)
    orders = scan_orders(grid)
    for k, name in enumerate(DIRECTIONS):
        assert torch.equal(xs[:, k], flat[:, :, orders[name]]), name  # step j reads token orders[name][j]
    torch.testing.assert_close(cross_merge(xs, grid), 4 * flat, rtol=0, atol=0)
    # merge of arbitrary per-direction outputs: each step's value lands on the token that step visits
    ys = torch.randn(2, 4, 3, h * w, dtype=torch.float64)
    expected = torch.zeros(2, 3, h * w, dtype=torch.float64)
    for k, name in enumerate(DIRECTIONS):
        expected[:, :, orders[name]] += ys[:, k]
    torch.testing.assert_close(cross_merge(ys, grid), expected)


def test_stage_grids_at_other_sizes() -> None:
    assert stage_grids((224, 224), 4) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert stage_grids((64, 64), 4) == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert stage_grids((37, 29), 3) == [(10, 8), (5, 4), (3, 2)]  # ceil halvings of the padded stride-2 convs
    model = VMamba(VMambaConfig(dims=(8, 16, 32), depths=(1, 1, 1), img_size=(37, 29)), device="meta")
    assert model.stage_grids() == [(10, 8), (5, 4), (3, 2)]
    layout = model.token_layout(1)
    assert (layout.grid, layout.cls_index, layout.patch_indices) == ((5, 4), None, tuple(range(20)))
    assert model.scan_orders(2)["col"].tolist() == [0, 2, 4, 1, 3, 5]
    assert model.scan_orders(grid=(2, 2))["col_rev"].tolist() == [3, 1, 2, 0]


# --------------------------------------------------------------------------------------------------------------------
# (3) An independent slow fp64 SS2D: per direction, the cells in that direction's order from explicit loops, the
# direction's own x_proj / dt_proj / A / D, and the recurrence h = exp(dt A) h + dt B u, y = C h + D u, step by step.


def tiny(d_state: int = 1, **kw) -> VMambaConfig:
    base = {"dims": (8, 16), "depths": (1, 1), "ssm_ratio": 2.0, "d_state": d_state, "img_size": 32, "num_classes": 5}
    return VMambaConfig(**{**base, **kw})


def cells(name: str, h: int, w: int) -> list[int]:
    if name.startswith("row"):
        path = [i * w + j for i in range(h) for j in range(w)]
    else:
        path = [i * w + j for j in range(w) for i in range(h)]
    return path[::-1] if name.endswith("_rev") else path


def slow_ss2d(op: SS2D, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x (B, H, W, d) -> (B, H, W, d), and each direction's y in its scan order (B, L, E)."""
    batch, h, w, _ = x.shape
    e, n, r = op.d_inner, op.d_state, op.dt_rank
    u = F.linear(x, op.in_proj.weight).permute(0, 3, 1, 2)
    u = F.silu(F.conv2d(u, op.conv2d.weight, padding=1, groups=e)).flatten(2)  # (B, E, L) raster
    merged = torch.zeros(batch, e, h * w, dtype=x.dtype)
    per_direction = {}
    a_all = -torch.exp(op.A_logs).view(4, e, n)
    for k, name in enumerate(DIRECTIONS):
        path = cells(name, h, w)
        xw = op.x_proj_weight[k]  # (R + 2N, E)
        a, d_skip = a_all[k], op.Ds.view(4, e)[k]
        state = torch.zeros(batch, e, n, dtype=x.dtype)
        ys = []
        for token in path:
            ut = u[:, :, token]  # (B, E)
            proj = ut @ xw.T  # (B, R + 2N)
            dt = F.softplus(proj[:, :r] @ op.dt_projs_weight[k].T + op.dt_projs_bias[k])  # (B, E)
            b_t, c_t = proj[:, r : r + n], proj[:, r + n :]  # (B, N): this direction's own B, C
            state = torch.exp(dt[:, :, None] * a) * state + dt[:, :, None] * b_t[:, None, :] * ut[:, :, None]
            y = (state * c_t[:, None, :]).sum(-1) + d_skip * ut
            merged[:, :, token] += y
            ys.append(y)
        per_direction[name] = torch.stack(ys, dim=1)
    y = F.layer_norm(merged.transpose(1, 2), (e,), op.out_norm.weight, op.out_norm.bias, eps=op.out_norm.eps)
    return F.linear(y, op.out_proj.weight).view(batch, h, w, -1), per_direction


@pytest.mark.parametrize("d_state", [1, 2])
def test_ss2d_matches_slow_fp64_loop(d_state: int) -> None:
    model = VMamba(tiny(d_state), seed=3, dtype=torch.float64)
    with torch.no_grad():  # move every parameter off its init so that no term hides (A_logs = 0, Ds = 1, ...)
        gen = torch.Generator().manual_seed(7)
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    for op, grid in ((model.layers[0].blocks[0].op, (8, 8)), (model.layers[1].blocks[0].op, (4, 4))):
        x = torch.randn(2, *grid, op.in_proj.in_features, dtype=torch.float64)
        with torch.no_grad():
            out, dirs = op(x, return_directions=True)
            ref, ref_dirs = slow_ss2d(op, x)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        for name in DIRECTIONS:
            torch.testing.assert_close(dirs[name], ref_dirs[name], rtol=1e-10, atol=1e-10)
        assert out.shape == x.shape and dirs["col"].shape == (2, grid[0] * grid[1], op.d_inner)


def test_directions_in_scan_order_reproduce_the_block() -> None:
    model = VMamba(tiny(2), seed=1, dtype=torch.float64)
    op = model.layers[0].blocks[0].op
    x = torch.randn(1, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out, dirs = op(x, return_directions=True)
        merged = torch.zeros(1, 64, op.d_inner, dtype=torch.float64)
        for name, order in model.scan_orders(0).items():
            merged[:, order] += dirs[name]
        rebuilt = op.project(merged.transpose(1, 2), (8, 8))
    torch.testing.assert_close(rebuilt, out)
    with pytest.raises(AssertionError):  # the orders matter: summing in step order is something else
        torch.testing.assert_close(op.project(sum(dirs.values()).transpose(1, 2), (8, 8)), out)


# --------------------------------------------------------------------------------------------------------------------
# (4) Model hooks, init, meta, reload, configs, registry


def test_forward_all_shapes_and_consistency() -> None:
    model = VMamba(tiny(2, depths=(2, 1)), seed=0, dtype=torch.float64).eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        out = model.forward_all(images, return_directions=True)
        logits = model(images)
    assert model.block_stages() == [0, 0, 1]
    assert [tuple(t.shape) for t in out.layer_tokens] == [(2, 64, 8), (2, 64, 8), (2, 16, 16)]
    assert out.final_tokens.shape == (2, 16, 16) and out.logits.shape == (2, 5)
    assert [tuple(d["row_rev"].shape) for d in out.directions] == [(2, 64, 16), (2, 64, 16), (2, 16, 32)]
    assert all(list(d) == list(DIRECTIONS) for d in out.directions)
    torch.testing.assert_close(out.logits, logits)
    final = model.classifier.norm(out.layer_tokens[-1])
    torch.testing.assert_close(out.final_tokens, final)
    torch.testing.assert_close(model.classifier.head(final.mean(1)), logits)
    # stage-0 tokens are the stem's grid in raster order: the downsample of the last stage-0 block's output
    grid = model.stage_grids()[0]
    nxt = model.layers[0].downsample(out.layer_tokens[1].unflatten(1, grid))
    block = model.layers[1].blocks[0]
    torch.testing.assert_close(block(nxt)[0].flatten(1, 2), out.layer_tokens[2])
    assert model.forward_all(images).directions is None


def test_other_image_sizes_run() -> None:
    model = VMamba(tiny(), seed=0)
    assert model(torch.randn(1, 3, 37, 29)).shape == (1, 5)
    out = model.forward_all(torch.randn(1, 3, 37, 29))
    assert [t.shape[1] for t in out.layer_tokens] == [10 * 8, 5 * 4]


def test_seeded_init_reproducible_and_upstream_like() -> None:
    a, b, c = (VMamba(tiny(2), seed=s) for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.0.blocks.0.op.x_proj_weight"], sc["layers.0.blocks.0.op.x_proj_weight"])
    assert not torch.equal(sa["layers.1.blocks.0.op.dt_projs_bias"], sc["layers.1.blocks.0.op.dt_projs_bias"])
    big = VMamba(VMambaConfig(dims=(96, 192), depths=(1, 1), d_state=4, img_size=32), seed=0)
    op = big.layers[1].blocks[0].op  # E = 192, R = 12
    assert torch.equal(op.A_logs, torch.log(torch.arange(1.0, 5.0)).expand(4 * 192, 4))
    assert torch.equal(op.Ds, torch.ones(4 * 192))
    assert op.dt_projs_weight.abs().max() <= 12**-0.5
    dt = F.softplus(op.dt_projs_bias)
    assert dt.min() >= 1e-3 - 1e-6 and dt.max() <= 0.1 + 1e-6
    assert op.x_proj_weight.abs().max() <= 192**-0.5  # nn.Linear default, bound 1 / sqrt(E)
    for linear in (op.in_proj, op.out_proj, big.layers[1].blocks[0].mlp.fc1):
        assert abs(linear.weight.std().item() - 0.02) < 0.002  # trunc_normal(0.02), Linear2d counts as Linear
    assert torch.equal(big.layers[1].blocks[0].mlp.fc1.bias, torch.zeros(768))
    conv = big.patch_embed[0]  # PyTorch default conv init, never re-initialised upstream
    assert conv.weight.abs().max() <= 27**-0.5 and conv.bias.abs().max() <= 27**-0.5 and conv.bias.abs().sum() > 0
    assert big.no_weight_decay() == {f"layers.{s}.blocks.0.op.{n}" for s in range(2) for n in ("A_logs", "Ds")}


def test_meta_allocates_nothing_and_strict_reload() -> None:
    meta = build_model("vmamba-b", device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())
    model = VMamba(tiny(2), seed=0)
    fresh = VMamba(tiny(2), seed=5)
    assert fresh.load_state_dict(model.state_dict(), strict=True)
    images = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(fresh(images), model(images))


@pytest.mark.parametrize(
    "bad",
    [
        {"patch_size": 16},
        {"dims": (8, 16), "depths": (1,)},
        {"dims": (8, 0)},
        {"depths": (1, 0)},
        {"dims": (7, 16)},
        {"d_state": 0},
        {"d_conv": 4},
        {"dt_rank": 0},
        {"ssm_ratio": 0.0},
        {"mlp_ratio": 0.0},
        {"num_classes": -1},
        {"img_size": 0},
        {"dt_min": 0.2},
        {"drop_path_rate": 1.0},
        {"in_chans": 0},
    ],
)
def test_invalid_configs_raise(bad: dict) -> None:
    with pytest.raises(ModelConfigError):
        tiny(**bad)


def test_config_dims_as_int_and_build_via_registry() -> None:
    assert VMambaConfig(dims=32, depths=(1, 1, 1)).dims == (32, 64, 128)
    model = build_model("vmamba-t", num_classes=10, img_size=64, seed=0)
    assert isinstance(model, VMamba) and model.stage_grids() == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert model.state_dict()["classifier.head.weight"].shape == (10, 768)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    headless = VMamba(dataclasses.replace(tiny(), num_classes=0), seed=0)
    assert headless(torch.randn(1, 3, 32, 32)).shape == (1, 16)  # the pooled features
    assert not any(k.startswith("classifier.head") for k in headless.state_dict())
