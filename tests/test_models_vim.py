"""Vision Mamba: upstream key/shape table, an independent slow fp64 forward, gradients, init, cls placements."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from tmconvert.models import ModelConfigError, VimConfig, VisionMamba, build_model, get_config, state_dict_shapes

# --------------------------------------------------------------------------------------------------------------------
# (1) The complete state dict, written out from upstream's models_mamba.py (hustvl/Vim@dd0358a)


def expected_vim_table(D: int, E: int, R: int, N: int = 16, K: int = 4, depth: int = 24) -> dict[str, tuple]:
    table = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 197, D),
        "patch_embed.proj.weight": (D, 3, 16, 16),
        "patch_embed.proj.bias": (D,),
        "head.weight": (1000, D),
        "head.bias": (1000,),
        "norm_f.weight": (D,),
    }
    for i in range(depth):
        layer = {
            "norm.weight": (D,),
            "mixer.A_log": (E, N),
            "mixer.D": (E,),
            "mixer.A_b_log": (E, N),
            "mixer.D_b": (E,),
            "mixer.in_proj.weight": (2 * E, D),
            "mixer.conv1d.weight": (E, 1, K),
            "mixer.conv1d.bias": (E,),
            "mixer.x_proj.weight": (R + 2 * N, E),
            "mixer.dt_proj.weight": (E, R),
            "mixer.dt_proj.bias": (E,),
            "mixer.conv1d_b.weight": (E, 1, K),
            "mixer.conv1d_b.bias": (E,),
            "mixer.x_proj_b.weight": (R + 2 * N, E),
            "mixer.dt_proj_b.weight": (E, R),
            "mixer.dt_proj_b.bias": (E,),
            "mixer.out_proj.weight": (D, E),
        }
        table.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return table


@pytest.mark.parametrize(
    ("name", "D", "E", "R", "params"),
    [("vim-t", 192, 384, 12, 7_148_008), ("vim-s", 384, 768, 24, 25_796_584), ("vim-b", 768, 1536, 48, 97_598_440)],
)
def test_state_dict_table_and_param_count(name: str, D: int, E: int, R: int, params: int) -> None:
    model = build_model(name, device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected_vim_table(D, E, R)
    assert state_dict_shapes(get_config(name)) == shapes
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(p.device.type == "meta" for p in model.parameters())


def test_vim_t_concrete_shapes() -> None:
    shapes = state_dict_shapes(get_config("vim-t"))
    assert shapes["layers.23.mixer.x_proj_b.weight"] == (44, 384)
    assert shapes["layers.0.mixer.in_proj.weight"] == (768, 192)
    assert shapes["layers.5.mixer.A_b_log"] == (384, 16)


def test_stride8_variant_grid() -> None:
    cfg = get_config("vim-s-stride8")
    assert cfg.grid == (27, 27) and cfg.num_patches == 729 and cfg.cls_index == 364
    assert state_dict_shapes(cfg)["pos_embed"] == (1, 730, 384)


# --------------------------------------------------------------------------------------------------------------------
# (2) An independent slow implementation: explicit loops, float64, flips exactly as upstream does them.


def ref_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def ref_branch(x: torch.Tensor, z: torch.Tensor, p: dict[str, torch.Tensor], s: str, cfg: VimConfig) -> torch.Tensor:
    """One mamba branch on token-major x, z (B, L, E), left to right; parameters named with suffix s."""
    batch, length, e = x.shape
    n, r, k_width = cfg.d_state, cfg.resolved_dt_rank, cfg.d_conv
    a_name = f"A{s}_log"
    w, bias = p[f"conv1d{s}.weight"][:, 0, :], p[f"conv1d{s}.bias"]
    conv = torch.zeros_like(x)
    for t in range(length):
        acc = bias.expand(batch, e).clone()
        for k in range(k_width):
            src = t - (k_width - 1) + k
            if src >= 0:
                acc = acc + w[:, k] * x[:, src]
        conv[:, t] = acc
    u = conv * torch.sigmoid(conv)
    dbl = u @ p[f"x_proj{s}.weight"].T
    dt_in, b_mat, c_mat = dbl[..., :r], dbl[..., r : r + n], dbl[..., r + n :]
    delta = torch.log1p(torch.exp(dt_in @ p[f"dt_proj{s}.weight"].T + p[f"dt_proj{s}.bias"]))
    a = -torch.exp(p[a_name])
    state = torch.zeros(batch, e, n, dtype=x.dtype)
    ys = []
    for t in range(length):
        dt = delta[:, t, :, None]
        state = torch.exp(dt * a) * state + dt * b_mat[:, t, None, :] * u[:, t, :, None]
        ys.append((state * c_mat[:, t, None, :]).sum(-1) + p[f"D{s}"] * u[:, t])
    return torch.stack(ys, dim=1) * (z * torch.sigmoid(z))


def ref_vim(sd: dict[str, torch.Tensor], cfg: VimConfig, images: torch.Tensor) -> dict:
    """Upstream `VisionMamba.forward_features` + head, bimamba v2 with flips, as upstream's fast path computes it."""
    e = cfg.d_inner
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=cfg.resolved_stride)
    x = x.flatten(2).transpose(1, 2)
    if cfg.cls_position == "middle":
        pos = x.shape[1] // 2
        x = torch.cat([x[:, :pos], sd["cls_token"].expand(x.shape[0], -1, -1), x[:, pos:]], dim=1)
    elif cfg.cls_position == "front":
        x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    residual = x + sd["pos_embed"]
    layers, branches = [], []
    for i in range(cfg.depth):
        p = {k[len(f"layers.{i}.mixer.") :]: v for k, v in sd.items() if k.startswith(f"layers.{i}.mixer.")}
        h = ref_rmsnorm(residual, sd[f"layers.{i}.norm.weight"], cfg.norm_eps)
        xz = h @ p["in_proj.weight"].T
        xs, zs = xz[..., :e], xz[..., e:]
        y_f = ref_branch(xs, zs, p, "", cfg)
        y_b_flipped = ref_branch(xs.flip(1), zs.flip(1), p, "_b", cfg)  # upstream flips the whole xz
        y = (y_f + y_b_flipped.flip(1)) / 2 if cfg.divide_out else y_f + y_b_flipped.flip(1)
        residual = residual + y @ p["out_proj.weight"].T
        layers.append(residual)
        branches.append({"fwd": y_f, "bwd": y_b_flipped})
    final = ref_rmsnorm(residual, sd["norm_f.weight"], cfg.norm_eps)
    pooled = final.mean(1) if cfg.cls_index is None else final[:, cfg.cls_index]
    logits = pooled @ sd["head.weight"].T + sd["head.bias"]
    return {"logits": logits, "final": final, "layers": layers, "branches": branches}


def tiny(**overrides) -> VimConfig:
    return VimConfig(
        **{"embed_dim": 16, "depth": 2, "img_size": (16, 16), "patch_size": 4, "num_classes": 10, **overrides}
    )


def randomized_fp64(cfg: VimConfig, seed: int = 0) -> VisionMamba:
    """Upstream init plus noise on every tensor, so forward and backward copies differ and every term matters."""
    model = VisionMamba(cfg, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1)
    return model


def tiny_images(cfg: VimConfig, batch: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, *cfg.img_size, generator=torch.Generator().manual_seed(7), dtype=dtype)


@pytest.mark.parametrize(
    ("cls_position", "divide_out"), [("middle", True), ("front", True), ("none", True), ("middle", False)]
)
def test_forward_matches_independent_reference(cls_position: str, divide_out: bool) -> None:
    cfg = tiny(cls_position=cls_position, divide_out=divide_out)
    model = randomized_fp64(cfg)
    images = tiny_images(cfg)
    with torch.no_grad():
        out = model.forward_all(images, return_directions=True)
        ref = ref_vim(model.state_dict(), cfg, images)
    tol = {"atol": 1e-10, "rtol": 1e-10}
    torch.testing.assert_close(out.logits, ref["logits"], **tol)
    torch.testing.assert_close(out.final_tokens, ref["final"], **tol)
    for i in range(cfg.depth):
        torch.testing.assert_close(out.layer_tokens[i], ref["layers"][i], **tol)
        # branch outputs before averaging, each in its own scan order (bwd: what upstream's flipped branch returns)
        for name in ("fwd", "bwd"):
            torch.testing.assert_close(out.directions[i][name], ref["branches"][i][name], **tol)
    assert out.logits.shape == (2, 10)
    assert out.final_tokens.shape == (2, cfg.seq_len, 16)
    assert out.directions[0]["bwd"].shape == (2, cfg.seq_len, cfg.d_inner)


def test_scan_orders_index_the_direction_outputs() -> None:
    """directions[name][:, j] is the branch output at token scan_orders()[name][j]."""
    cfg = tiny()
    model = VisionMamba(cfg, seed=0)
    images = tiny_images(cfg, dtype=torch.float32)
    orders = model.scan_orders()
    assert torch.equal(orders["fwd"], torch.arange(cfg.seq_len))
    assert torch.equal(orders["bwd"], torch.arange(cfg.seq_len).flip(0))
    with torch.no_grad():
        out = model.forward_all(images, return_directions=True)
        # the bwd branch in token order: scatter the scan-ordered output back through its permutation
        bwd_token_order = torch.empty_like(out.directions[0]["bwd"])
        bwd_token_order[:, orders["bwd"]] = out.directions[0]["bwd"]
        mixed = model.layers[0].mixer.out_proj((out.directions[0]["fwd"] + bwd_token_order) / 2)
        torch.testing.assert_close(out.layer_tokens[0], model._embed(images) + mixed)
        assert model.forward_all(images).directions is None


# --------------------------------------------------------------------------------------------------------------------
# (3) gradients, (4) a real ViM-T step on CPU


def test_gradients_reach_every_parameter() -> None:
    cfg = tiny()
    model = VisionMamba(cfg, seed=0)
    images = tiny_images(cfg, dtype=torch.float32)
    loss = F.cross_entropy(model(images), torch.tensor([1, 2]))
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert {"layers.1.mixer.A_b_log", "layers.1.mixer.D_b", "layers.0.mixer.conv1d_b.bias"} <= set(names)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.slow
def test_vim_t_forward_backward_on_cpu() -> None:
    model = build_model("vim-t", seed=0)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    loss = F.cross_entropy(model(images), torch.tensor([3, 999]))
    loss.backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(loss)
    assert 0.5 * math.log(1000) < loss.item() < 2 * math.log(1000)  # near-uniform predictions at init
    assert torch.isfinite(model.layers[23].mixer.A_b_log.grad).all()
    assert model.layers[0].mixer.dt_proj_b.bias.grad.abs().sum() > 0
    print(f"ViM-T fwd+bwd, batch 2, 224 px on CPU: {elapsed:.2f} s")


def test_reduced_precision_keeps_the_residual_in_fp32() -> None:
    cfg = tiny()
    model = VisionMamba(cfg, seed=0, dtype=torch.bfloat16)
    out = model.forward_all(tiny_images(cfg, dtype=torch.bfloat16))
    assert out.layer_tokens[0].dtype == torch.float32
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    fp32 = VisionMamba(cfg, seed=0)
    torch.testing.assert_close(out.logits.float(), fp32(tiny_images(cfg, dtype=torch.float32)), atol=0.1, rtol=0.1)


# --------------------------------------------------------------------------------------------------------------------
# (5) initialisation


def test_init_statistics() -> None:
    cfg = get_config("vim-t")
    cfg = VimConfig(**{**cfg.__dict__, "depth": 3})
    model = VisionMamba(cfg, seed=0)
    e, n, r = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
    log_n = torch.log(torch.arange(1, n + 1, dtype=torch.float32))
    dt_draws = []
    for layer in model.layers:
        mixer = layer.mixer
        for s in ("", "_b"):
            a_log = getattr(mixer, f"A{s}_log")
            assert a_log.dtype == torch.float32
            torch.testing.assert_close(a_log, log_n.expand(e, n), rtol=0, atol=0)
            assert torch.equal(getattr(mixer, f"D{s}"), torch.ones(e))
            dt = F.softplus(getattr(mixer, f"dt_proj{s}").bias)
            assert dt.min() >= cfg.dt_min * (1 - 1e-5) and dt.max() <= cfg.dt_max * (1 + 1e-5)
            assert dt.min() < 2 * cfg.dt_min and dt.max() > cfg.dt_max / 2  # spread over the whole log-range
            # log-uniform: the mean of log(dt) sits in the middle of [log dt_min, log dt_max]
            mid = (math.log(cfg.dt_min) + math.log(cfg.dt_max)) / 2
            assert abs(dt.log().mean().item() - mid) < 0.3
            dt_draws.append(dt)
            assert getattr(mixer, f"dt_proj{s}").weight.abs().max() <= r**-0.5 * cfg.dt_scale
            conv_bias = getattr(mixer, f"conv1d{s}").bias
            assert conv_bias.abs().max() <= 1 / math.sqrt(cfg.d_conv) and conv_bias.abs().sum() > 0
        bound = 1 / math.sqrt(e) / math.sqrt(cfg.depth)  # kaiming-uniform(a=sqrt 5) bound, then / sqrt(depth)
        w = mixer.out_proj.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert torch.equal(layer.norm.weight, torch.ones(cfg.embed_dim))
    assert not torch.equal(dt_draws[0], dt_draws[1])  # fwd and bwd copies draw independently
    assert torch.equal(model.head.bias, torch.zeros(1000)) and torch.equal(
        model.patch_embed.proj.bias, torch.zeros(192)
    )
    assert torch.equal(model.norm_f.weight, torch.ones(192))
    for tensor in (model.pos_embed, model.cls_token.expand(1, 50, -1), model.head.weight):
        assert abs(tensor.std().item() - 0.02) < 0.003
    lecun_std = math.sqrt(1 / (3 * 16 * 16)) / 0.87962566103423978
    assert abs(model.patch_embed.proj.weight.std().item() - lecun_std) / lecun_std < 0.05


def test_init_is_seeded() -> None:
    cfg = tiny()
    a, b, c = VisionMamba(cfg, seed=5), VisionMamba(cfg, seed=5), VisionMamba(cfg, seed=6)
    gen_model = VisionMamba(cfg, seed=torch.Generator().manual_seed(5))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
        assert torch.equal(value, gen_model.state_dict()[key]), key
    assert not torch.equal(a.layers[0].mixer.dt_proj.bias, c.layers[0].mixer.dt_proj.bias)
    assert not torch.equal(a.pos_embed, c.pos_embed)


def test_no_weight_decay_names() -> None:
    names = VisionMamba(tiny(), device="meta").no_weight_decay()
    assert {"pos_embed", "cls_token", "layers.1.mixer.A_b_log", "layers.0.mixer.D_b", "layers.0.mixer.D"} <= names
    assert "layers.0.mixer.in_proj.weight" not in names


# --------------------------------------------------------------------------------------------------------------------
# (6) cls placement and token layout; reading configs back from state-dict shapes


@pytest.mark.parametrize(
    ("cls_position", "cls_index", "seq_len", "pos_len"),
    [("middle", 8, 17, 17), ("front", 0, 17, 17), ("none", None, 16, 16)],
)
def test_cls_placement(cls_position: str, cls_index: int | None, seq_len: int, pos_len: int) -> None:
    cfg = tiny(cls_position=cls_position)
    assert (cfg.cls_index, cfg.seq_len) == (cls_index, seq_len)
    shapes = state_dict_shapes(cfg)
    assert shapes["pos_embed"] == (1, pos_len, 16)
    assert ("cls_token" in shapes) == (cls_position != "none")
    layout = cfg.token_layout()
    assert layout.cls_index == cls_index and layout.grid == (4, 4) and layout.seq_len == seq_len
    others = [i for i in range(seq_len) if i != cls_index]
    assert list(layout.patch_indices) == others  # patches keep raster order around the cls slot


def test_cls_token_feeds_the_head() -> None:
    """The middle cls token, placed before pos_embed is added, is what the head reads."""
    cfg = tiny()
    model = VisionMamba(cfg, seed=0)
    images = tiny_images(cfg, dtype=torch.float32)
    with torch.no_grad():
        embedded = model._embed(images)
        patches = model.patch_embed(images)
        torch.testing.assert_close(embedded[:, 8], (model.cls_token[0, 0] + model.pos_embed[0, 8]).expand(2, -1))
        torch.testing.assert_close(embedded[:, 9], patches[:, 8] + model.pos_embed[0, 9])
        out = model.forward_all(images)
        torch.testing.assert_close(out.logits, model.head(out.final_tokens[:, 8]))
        torch.testing.assert_close(model(images), out.logits)


def test_vim_t_layout() -> None:
    layout = get_config("vim-t").token_layout()
    assert layout.cls_index == 98 and layout.patch_indices[97] == 97 and layout.patch_indices[98] == 99
    assert len(layout.patch_indices) == 196 and layout.patch_indices[-1] == 196


@pytest.mark.parametrize("name", ["vim-t", "vim-s", "vim-b"])
def test_from_state_dict_shapes_round_trip(name: str) -> None:
    cfg = get_config(name)
    assert VimConfig.from_state_dict_shapes(state_dict_shapes(cfg)) == cfg


def test_from_state_dict_shapes_hints() -> None:
    stride8 = get_config("vim-t-stride8")
    shapes = state_dict_shapes(stride8)
    assert VimConfig.from_state_dict_shapes(shapes, img_size=224) == stride8
    with pytest.raises(ModelConfigError, match=r"not a square grid|does not fit"):
        VimConfig.from_state_dict_shapes({**shapes, "pos_embed": (1, 700, 192)})
    wide = tiny(img_size=(16, 24), stride=2)  # 7 x 11 overlapping patches
    assert VimConfig.from_state_dict_shapes(state_dict_shapes(wide), img_size=(16, 24)) == wide
    with pytest.raises(ModelConfigError, match="no stride"):
        VimConfig.from_state_dict_shapes(state_dict_shapes(wide), img_size=(16, 16))
    front = tiny(cls_position="front")
    assert VimConfig.from_state_dict_shapes(state_dict_shapes(front), cls_position="front") == front
    no_cls = tiny(cls_position="none")
    assert VimConfig.from_state_dict_shapes(state_dict_shapes(no_cls)) == no_cls
    assert VimConfig.from_state_dict_shapes(state_dict_shapes(tiny(num_classes=0))).num_classes == 0


def test_from_state_dict_shapes_rejects_other_layouts() -> None:
    shapes = state_dict_shapes(get_config("vim-t"))
    v1 = {k: v for k, v in shapes.items() if "_b" not in k.rsplit(".", 1)[0] and "A_b_log" not in k}
    with pytest.raises(ModelConfigError, match=r"missing layers\.0\.mixer\.A_b_log"):
        VimConfig.from_state_dict_shapes(v1)
    with pytest.raises(ModelConfigError, match=r"unexpected layers\.3\.mixer\.in_proj\.bias"):
        VimConfig.from_state_dict_shapes({**shapes, "layers.3.mixer.in_proj.bias": (768,)})
    with pytest.raises(ModelConfigError, match=r"layers\.7\.mixer\.x_proj\.weight is \(40, 384\)"):
        VimConfig.from_state_dict_shapes({**shapes, "layers.7.mixer.x_proj.weight": (40, 384)})
    with pytest.raises(ModelConfigError, match="not a Vim state dict"):
        VimConfig.from_state_dict_shapes({"blocks.0.attn.qkv.weight": (576, 192)})
    with pytest.raises(ModelConfigError, match="contradicts"):
        VimConfig.from_state_dict_shapes(shapes, cls_position="none")


def test_upstream_checkpoint_loads_strictly_and_wrong_image_size_is_refused() -> None:
    cfg = tiny()
    source = VisionMamba(cfg, seed=1)
    target = VisionMamba(cfg, seed=2)
    target.load_state_dict(source.state_dict(), strict=True)
    images = tiny_images(cfg, dtype=torch.float32)
    torch.testing.assert_close(target(images), source(images), rtol=0, atol=0)
    with pytest.raises(ModelConfigError, match="expects"):
        target(torch.zeros(1, 3, 20, 16))


def test_invalid_configs() -> None:
    with pytest.raises(ModelConfigError, match="cls_position"):
        VimConfig(cls_position="left")
    with pytest.raises(ModelConfigError, match="dt_min"):
        VimConfig(dt_min=0.2, dt_max=0.1)
    assert VimConfig(embed_dim=200).resolved_dt_rank == 13 and VimConfig(dt_rank=4).resolved_dt_rank == 4
