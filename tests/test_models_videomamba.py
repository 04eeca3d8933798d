"""VideoMamba: upstream key/shape table and order, an independent fp64 embedding + token order, summed directions,
temporal resampling, frame/patch indexing, kernel inflation, init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tmconvert.models import (
    ModelConfigError,
    TokenLayout,
    VideoMamba,
    VideoMambaConfig,
    VimConfig,
    build_model,
    family_of,
    get_config,
    inflate_image_kernel,
    list_models,
    state_dict_shapes,
)
from tmconvert.models.videomamba import resample_temporal_pos_embed
from tmconvert.models.vim import Block, RMSNorm

# --------------------------------------------------------------------------------------------------------------------
# (1) The state dict, written out from upstream's video_sm/models/videomamba.py and its mamba fork (mamba_simple.py)


def expected_table(D: int, E: int, R: int, depth: int, N: int = 16, K: int = 4) -> dict[str, tuple]:
    """Upstream's state_dict in order: own parameters, patch_embed, head, layers (mixer before norm), norm_f."""
    table = {
        "cls_token": (1, 1, D),
        "pos_embed": (1, 197, D),
        "temporal_pos_embedding": (1, 8, D),
        "patch_embed.proj.weight": (D, 3, 1, 16, 16),
        "patch_embed.proj.bias": (D,),
        "head.weight": (1000, D),
        "head.bias": (1000,),
    }
    for i in range(depth):
        layer = {
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
            "norm.weight": (D,),
        }
        table.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    table["norm_f.weight"] = (D,)
    return table


@pytest.mark.parametrize(
    ("name", "D", "E", "R", "depth", "params", "millions"),
    [
        ("videomamba-ti", 192, 384, 12, 24, 7_149_544, 7),
        ("videomamba-s", 384, 768, 24, 24, 25_799_656, 26),
        ("videomamba-m", 576, 1152, 36, 32, 74_222_056, 74),
    ],
)
def test_state_dict_table_order_and_param_count(
    name: str, D: int, E: int, R: int, depth: int, params: int, millions: int
) -> None:
    model = build_model(name, device="meta")
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert shapes == list(expected_table(D, E, R, depth).items())  # keys, shapes and order
    assert list(state_dict_shapes(get_config(name)).items()) == shapes
    total = sum(p.numel() for p in model.parameters())
    assert total == params
    assert round(total / 1e6) == millions  # the published 7 / 26 / 74 M
    assert all(p.device.type == "meta" for p in model.parameters())


def test_videomamba_ti_keys() -> None:
    shapes = state_dict_shapes(get_config("videomamba-ti"))
    assert len(shapes) == 7 + 24 * 17 + 1 == 416
    assert list(shapes)[:9] == [
        "cls_token",
        "pos_embed",
        "temporal_pos_embedding",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "head.weight",
        "head.bias",
        "layers.0.mixer.A_log",
        "layers.0.mixer.D",
    ]
    assert list(shapes)[23:25] == ["layers.0.norm.weight", "layers.1.mixer.A_log"]
    assert shapes["patch_embed.proj.weight"] == (192, 3, 1, 16, 16)
    assert shapes["temporal_pos_embedding"] == (1, 8, 192)
    assert shapes["layers.23.mixer.x_proj_b.weight"] == (44, 384)
    assert shapes["layers.0.mixer.in_proj.weight"] == (768, 192)


def test_registry() -> None:
    assert list_models("videomamba") == ["videomamba-m", "videomamba-s", "videomamba-ti"]
    assert family_of(get_config("videomamba-s")) == "videomamba"
    cfg = get_config("videomamba-m")
    assert (cfg.num_frames, cfg.tubelet, cfg.img_size, cfg.patch_size, cfg.norm_eps) == (8, 1, (224, 224), 16, 1e-5)


def test_adapted_build() -> None:
    shapes = state_dict_shapes(
        VideoMambaConfig(**{**get_config("videomamba-ti").__dict__, "num_classes": 10, "img_size": 112})
    )
    assert shapes["pos_embed"] == (1, 50, 192)
    model = build_model("videomamba-ti", num_classes=10, img_size=112, patch_size=14, num_frames=4, depth=2, seed=0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["pos_embed"] == (1, 65, 192) and shapes["temporal_pos_embedding"] == (1, 4, 192)
    assert shapes["patch_embed.proj.weight"] == (192, 3, 1, 14, 14) and shapes["head.weight"] == (10, 192)
    assert model.cfg.grid == (8, 8) and model.cfg.seq_len() == 1 + 4 * 64
    clip = torch.randn(2, 3, 4, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.forward_all(clip)
    assert out.logits.shape == (2, 10) and out.final_tokens.shape == (2, 257, 192)
    assert torch.isfinite(out.logits).all()
    meta = build_model("videomamba-ti", num_classes=10, img_size=112, patch_size=14, num_frames=4, device="meta")
    assert sum(p.numel() for p in meta.parameters()) == 6_897_802  # smaller head, grid, kernel and table


# --------------------------------------------------------------------------------------------------------------------
# (2) An independent fp64 reference: tokens built patch by patch, then ViM's layer stack with summed directions


def tiny(**overrides) -> VideoMambaConfig:
    fields = {"embed_dim": 16, "depth": 2, "img_size": 32, "patch_size": 16, "num_frames": 2, "num_classes": 10}
    return VideoMambaConfig(**{**fields, **overrides})


def randomized_fp64(cfg: VideoMambaConfig, seed: int = 0) -> VideoMamba:
    """Upstream init plus noise on every tensor (cls and temporal are zero at init), so every term matters."""
    model = VideoMamba(cfg, seed=seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1)
    return model


def clip_of(cfg: VideoMambaConfig, frames: int, batch: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    shape = (batch, cfg.in_chans, frames, *cfg.img_size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=dtype)


def ref_tokens(sd: dict[str, torch.Tensor], cfg: VideoMambaConfig, clip: torch.Tensor) -> torch.Tensor:
    """[cls + pos[0]], then per time step each patch in raster order: patch . kernel + bias + pos + temporal."""
    k, p = cfg.tubelet, cfg.patch_size
    rows, cols = cfg.grid
    weight, bias = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
    tokens = [(sd["cls_token"][0, 0] + sd["pos_embed"][0, 0]).expand(clip.shape[0], -1)]
    for t in range(clip.shape[2] // k):
        for r in range(rows):
            for c in range(cols):
                cube = clip[:, :, t * k : (t + 1) * k, r * p : (r + 1) * p, c * p : (c + 1) * p]
                patch = torch.einsum("bckij,dckij->bd", cube, weight) + bias
                tokens.append(patch + sd["pos_embed"][0, 1 + r * cols + c] + sd["temporal_pos_embedding"][0, t])
    return torch.stack(tokens, dim=1)


def ref_forward(sd: dict[str, torch.Tensor], cfg: VideoMambaConfig, clip: torch.Tensor) -> dict:
    """ViM blocks with divide_out=False (their own tests check them against an explicit scan), cls head at 0."""
    vim_cfg = VimConfig(embed_dim=cfg.embed_dim, depth=cfg.depth, divide_out=False)
    residual = ref_tokens(sd, cfg, clip)
    layers, branches = [], []
    for i in range(cfg.depth):
        block = Block(vim_cfg, 0.0, dtype=torch.float64)
        prefix = f"layers.{i}."
        block.load_state_dict({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
        residual, directions = block(residual, return_directions=True)
        layers.append(residual)
        branches.append(directions)
    norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, dtype=torch.float64)
    norm.load_state_dict({"weight": sd["norm_f.weight"]})
    final = norm(residual)
    logits = final[:, 0] @ sd["head.weight"].T + sd["head.bias"]
    return {"tokens": ref_tokens(sd, cfg, clip), "logits": logits, "final": final, "layers": layers, "dirs": branches}


@pytest.mark.parametrize(("frames", "tubelet"), [(2, 1), (4, 2)])
def test_forward_matches_independent_reference(frames: int, tubelet: int) -> None:
    cfg = tiny(num_frames=frames, tubelet=tubelet)
    model = randomized_fp64(cfg)
    clip = clip_of(cfg, frames)
    with torch.no_grad():
        out = model.forward_all(clip, return_directions=True)
        ref = ref_forward(model.state_dict(), cfg, clip)
        torch.testing.assert_close(model._embed(clip), ref["tokens"], rtol=1e-12, atol=1e-12)
    tol = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out.logits, ref["logits"], **tol)
    torch.testing.assert_close(out.final_tokens, ref["final"], **tol)
    for i in range(cfg.depth):
        torch.testing.assert_close(out.layer_tokens[i], ref["layers"][i], **tol)
        for name in ("fwd", "bwd"):
            torch.testing.assert_close(out.directions[i][name], ref["dirs"][i][name], **tol)
    assert out.final_tokens.shape == (2, 1 + 2 * 4, 16) and out.logits.shape == (2, 10)
    torch.testing.assert_close(model(clip), out.logits, rtol=0, atol=0)


def test_directions_are_summed_in_scan_order() -> None:
    """layer 0 = tokens + out_proj(fwd + bwd) with bwd scattered back through its scan order; not the ViM average."""
    cfg = tiny()
    model = randomized_fp64(cfg)
    clip = clip_of(cfg, 2)
    orders = model.scan_orders()
    seq_len = 1 + 2 * 4
    assert torch.equal(orders["fwd"], torch.arange(seq_len))
    assert torch.equal(orders["bwd"], torch.arange(seq_len).flip(0))
    assert model.scan_orders(frames=1)["bwd"].tolist() == [4, 3, 2, 1, 0]
    with torch.no_grad():
        out = model.forward_all(clip, return_directions=True)
        bwd = torch.empty_like(out.directions[0]["bwd"])
        bwd[:, orders["bwd"]] = out.directions[0]["bwd"]
        out_proj = model.layers[0].mixer.out_proj
        tokens = model._embed(clip)
        torch.testing.assert_close(out.layer_tokens[0], tokens + out_proj(out.directions[0]["fwd"] + bwd))
        averaged = tokens + out_proj((out.directions[0]["fwd"] + bwd) / 2)
        assert (out.layer_tokens[0] - averaged).abs().max() > 1e-3
        assert model.forward_all(clip).directions is None
    assert out.directions[1]["fwd"].shape == (2, seq_len, 32)


# --------------------------------------------------------------------------------------------------------------------
# (3) images, temporal resampling, where each (frame, patch) token sits


def test_image_is_a_one_frame_clip() -> None:
    for frames in (1, 2):
        model = randomized_fp64(tiny(num_frames=frames))
        images = clip_of(model.cfg, 1)[:, :, 0]
        with torch.no_grad():
            out = model.forward_all(images)
            torch.testing.assert_close(out.logits, model(images[:, :, None]), rtol=0, atol=0)
        assert out.final_tokens.shape == (2, 5, 16)


def test_temporal_embedding_is_resampled_linearly() -> None:
    cfg = tiny(num_frames=4)
    model = randomized_fp64(cfg)
    with torch.no_grad():
        model.temporal_pos_embedding.copy_(torch.arange(4.0, dtype=torch.float64)[None, :, None].expand(1, 4, 16))
    expected = {1: [1.5], 2: [0.5, 2.5], 4: [0, 1, 2, 3], 8: [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]}
    for frames, values in expected.items():
        clip = clip_of(cfg, frames)
        with torch.no_grad():
            embedded = model._embed(clip)
            model.temporal_pos_embedding.zero_()
            without = model._embed(clip)
            model.temporal_pos_embedding.copy_(torch.arange(4.0, dtype=torch.float64)[None, :, None].expand(1, 4, 16))
        added = (embedded - without)[:, model.frame_patch_indices(frames)]  # (B, T, P, D)
        torch.testing.assert_close(
            added, torch.tensor(values, dtype=torch.float64)[None, :, None, None].expand_as(added)
        )
        assert torch.equal(embedded[:, 0], without[:, 0])  # cls gets no temporal embedding
    table = torch.randn(1, 8, 5, dtype=torch.float64)
    assert resample_temporal_pos_embed(table, 8) is table
    torch.testing.assert_close(resample_temporal_pos_embed(table, 1), (table[:, 3:4] + table[:, 4:5]) / 2)


def test_frame_patch_indices_and_token_layout() -> None:
    cfg = tiny()
    assert cfg.frame_patch_indices().tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert cfg.frame_patch_indices(1).tolist() == [[1, 2, 3, 4]]
    ti = get_config("videomamba-ti")
    indices = ti.frame_patch_indices()
    assert indices.shape == (8, 196) and indices.dtype == torch.long and indices[3, 17] == 1 + 3 * 196 + 17
    assert VideoMambaConfig(tubelet=2).frame_patch_indices().shape == (4, 196)
    image = ti.token_layout(frames=1)
    assert image == TokenLayout(grid=(14, 14), cls_index=0, patch_indices=tuple(range(1, 197)))
    deit = TokenLayout(grid=(14, 14), cls_index=0, patch_indices=tuple(range(1, 197)))
    index, valid = image.positions_in(deit)
    assert torch.equal(index, torch.arange(197)) and valid.all()
    clip = ti.token_layout()
    assert clip.grid == (8 * 14, 14) and clip.seq_len == ti.seq_len() == 1 + 8 * 196
    assert list(clip.patch_indices) == indices.flatten().tolist()

    # the token at frame_patch_indices[t, p] is patch p of frame t
    model = randomized_fp64(tiny(num_frames=3))
    video = clip_of(model.cfg, 3)
    with torch.no_grad():
        tokens = model._embed(video)
        t, p = 2, 3  # patch 3 = row 1, column 1 of the 2x2 grid
        conv = F.conv2d(video[:, :, t], model.patch_embed.proj.weight[:, :, 0], model.patch_embed.proj.bias, stride=16)
        want = conv[:, :, 1, 1] + model.pos_embed[0, 1 + p] + model.temporal_pos_embedding[0, t]
        torch.testing.assert_close(tokens[:, model.frame_patch_indices()[t, p]], want)


# --------------------------------------------------------------------------------------------------------------------
# (4) kernel inflation


def test_inflate_center_and_average() -> None:
    weight = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for frames, middle in ((3, 1), (4, 2), (1, 0)):
        center = inflate_image_kernel(weight, frames, mode="center")
        assert center.shape == (6, 3, frames, 4, 4) and center.dtype == torch.float64
        assert torch.equal(center[:, :, middle], weight)
        assert center.abs().sum() == weight.abs().sum()  # zeros elsewhere
        average = inflate_image_kernel(weight, frames, mode="average")
        for t in range(frames):
            torch.testing.assert_close(average[:, :, t], weight / frames, rtol=0, atol=0)
    with pytest.raises(ModelConfigError, match="inflate mode"):
        inflate_image_kernel(weight, 2, mode="middle")
    with pytest.raises(ModelConfigError, match="kernel"):
        inflate_image_kernel(weight[0], 2)


@pytest.mark.parametrize("mode", ["center", "average"])
def test_inflated_kernel_embeds_like_the_image_kernel(mode: str) -> None:
    """Averaged: T identical frames give the image embedding. Centre: a clip gives its middle frame's embedding."""
    cfg = tiny(num_frames=4, tubelet=4)
    model = VideoMamba(cfg, seed=0, dtype=torch.float64)
    weight2d = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    frames = clip_of(cfg, 4)
    clip = frames[:, :, :1].expand(-1, -1, 4, -1, -1) if mode == "average" else frames
    with torch.no_grad():
        model.patch_embed.proj.weight.copy_(inflate_image_kernel(weight2d, 4, mode=mode))
        got = model.patch_embed(clip)  # (B, 1, P, D)
    want = F.conv2d(clip[:, :, 2], weight2d, model.patch_embed.proj.bias, stride=16).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got[:, 0], want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------------
# (5) initialisation, meta construction, reload


def test_init_follows_upstream() -> None:
    cfg = VideoMambaConfig(depth=3)
    model = VideoMamba(cfg, seed=0)
    e, n = cfg.d_inner, cfg.d_state
    assert torch.equal(model.cls_token, torch.zeros(1, 1, 192))  # upstream never re-initialises cls_token
    assert torch.equal(model.temporal_pos_embedding, torch.zeros(1, 8, 192))
    for tensor in (model.pos_embed, model.head.weight):
        assert abs(tensor.std().item() - 0.02) < 0.002
    assert torch.equal(model.head.bias, torch.zeros(1000))
    fan_in = 3 * 16 * 16  # Conv3d keeps PyTorch's default: U(+-1/sqrt(fan_in)) for weight and bias
    for tensor in (model.patch_embed.proj.weight, model.patch_embed.proj.bias):
        assert 0.9 / math.sqrt(fan_in) < tensor.abs().max() <= 1 / math.sqrt(fan_in)
    for layer in model.layers:
        mixer = layer.mixer
        assert abs(mixer.in_proj.weight.std().item() - 0.02) < 0.001
        for s in ("", "_b"):
            torch.testing.assert_close(getattr(mixer, f"A{s}_log"), torch.log(torch.arange(1.0, n + 1)).expand(e, n))
            assert torch.equal(getattr(mixer, f"D{s}"), torch.ones(e))
            # segm_init_weights re-draws every Linear: dt_proj too, its dt bias ends at zero (softplus = ln 2)
            assert torch.equal(getattr(mixer, f"dt_proj{s}").bias, torch.zeros(e))
            for proj in ("dt_proj", "x_proj"):
                assert abs(getattr(mixer, f"{proj}{s}").weight.std().item() - 0.02) < 0.003
            conv = getattr(mixer, f"conv1d{s}")
            assert conv.bias.abs().max() <= 0.5 and conv.weight.abs().max() <= 0.5 and conv.bias.abs().sum() > 0
        bound = 1 / math.sqrt(e) / math.sqrt(cfg.depth)
        assert 0.9 * bound < mixer.out_proj.weight.abs().max() <= bound
        assert torch.equal(layer.norm.weight, torch.ones(192))
    assert not torch.equal(model.layers[0].mixer.x_proj.weight, model.layers[0].mixer.x_proj_b.weight)
    layer = model.layers[1]
    layer.reset_parameters(torch.Generator().manual_seed(3))  # a layer alone re-draws VideoMamba's init, not ViM's
    assert torch.equal(layer.mixer.dt_proj_b.bias, torch.zeros(e))
    assert abs(layer.mixer.in_proj.weight.std().item() - 0.02) < 0.001
    assert torch.equal(model.norm_f.weight, torch.ones(192))


def test_init_is_seeded() -> None:
    cfg = tiny()
    a, b, c = VideoMamba(cfg, seed=5), VideoMamba(cfg, seed=5), VideoMamba(cfg, seed=6)
    gen_model = VideoMamba(cfg, seed=torch.Generator().manual_seed(5))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
        assert torch.equal(value, gen_model.state_dict()[key]), key
    assert not torch.equal(a.layers[0].mixer.in_proj.weight, c.layers[0].mixer.in_proj.weight)
    assert not torch.equal(a.pos_embed, c.pos_embed)
    a.reset_parameters(6)
    assert all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_meta_model_allocates_nothing() -> None:
    model = VideoMamba(get_config("videomamba-m"), device="meta")
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    assert model.no_weight_decay() >= {"temporal_pos_embedding", "cls_token", "pos_embed", "layers.31.mixer.A_b_log"}
    assert "layers.0.mixer.in_proj.weight" not in model.no_weight_decay()
    assert [layer.drop_path.rate for layer in VideoMamba(tiny(depth=3, drop_path_rate=0.2), device="meta").layers] == [
        pytest.approx(r) for r in (0.0, 0.1, 0.2)
    ]


def test_strict_reload_and_refused_inputs() -> None:
    cfg = tiny()
    source, target = VideoMamba(cfg, seed=1), VideoMamba(cfg, seed=2)
    target.load_state_dict(source.state_dict(), strict=True)
    clip = clip_of(cfg, 2, dtype=torch.float32)
    torch.testing.assert_close(target(clip), source(clip), rtol=0, atol=0)
    with pytest.raises(ModelConfigError, match="expects"):
        target(torch.zeros(1, 3, 2, 32, 48))
    with pytest.raises(ModelConfigError, match="multiple of 2"):
        VideoMamba(tiny(num_frames=4, tubelet=2), seed=0)(torch.zeros(1, 3, 3, 32, 32))
    with pytest.raises(ModelConfigError, match="3-D"):
        target(torch.zeros(3, 32, 32))


def test_headless_model_returns_the_cls_features() -> None:
    model = VideoMamba(tiny(num_classes=0), seed=0)
    out = model.forward_all(clip_of(model.cfg, 2, dtype=torch.float32))
    assert torch.equal(out.logits, out.final_tokens[:, 0])
    assert "head.weight" not in model.state_dict()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_frames": 6, "tubelet": 4}, "num_frames"),
        ({"tubelet": 0}, "tubelet"),
        ({"patch_size": 40}, "no patch"),
        ({"num_classes": -1}, "num_classes"),
        ({"dt_rank": 0}, "dt_rank"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"embed_dim": 0}, "embed_dim"),
    ],
)
def test_invalid_configs(overrides: dict, message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        tiny(**overrides)


def test_config_helpers() -> None:
    assert VideoMambaConfig(embed_dim=200).resolved_dt_rank == 13 and VideoMambaConfig(dt_rank=4).resolved_dt_rank == 4
    cfg = VideoMambaConfig(img_size=(112, 96), patch_size=14, num_frames=6, tubelet=2)
    assert cfg.grid == (8, 6) and cfg.time_steps() == 3 and cfg.seq_len(2) == 1 + 48
    assert cfg.layer_config.divide_out is False and cfg.layer_config.embed_dim == 192
    with pytest.raises(ModelConfigError, match="multiple of 2"):
        cfg.time_steps(5)
