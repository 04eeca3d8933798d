"""VideoMamba (OpenGVLab/VideoMamba, `videomamba/video_sm/models/videomamba.py`) target model.

Parameter names and shapes are exactly upstream's, in upstream's state_dict order. The layer stack is ViM's (residual
add in fp32 -> RMSNorm -> bimamba v2 mixer), with one difference from Vim: the fork's mixer sums the two directions
(`out_proj(out + out_b.flip)`, no /2). The sequence is `[cls, frame 0 patches, frame 1 patches, ...]`: spatial
positions are shared by every frame, a learned temporal embedding is added per frame, the cls token sits at 0.

Image input (B, C, H, W) is a one-frame clip. A clip whose number of time steps differs from the config's gets the
temporal table linearly resampled, as upstream's fine-tuning does when it changes the frame count; for one frame that
is the table's centre (the mean of the two middle slots for an even count). An image VideoMamba has no temporal table
at all, so this is a choice: it keeps image input equal to a one-frame clip, and it adds nothing at init (the table
starts at zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.models.errors import ModelConfigError
from tmconvert.models.init import init_on_cpu_, seeded_generator
from tmconvert.models.registry import register, register_family
from tmconvert.models.tokens import TokenLayout
from tmconvert.models.vim import (
    VIM_DIRECTIONS,
    BiMambaMixer,
    Block,
    MambaOutput,
    RMSNorm,
    VimConfig,
    run_layers,
    ssm_no_decay,
)

INFLATE_MODES = ("center", "average")


@dataclass(frozen=True)
class VideoMambaConfig:
    """Shape hyper-parameters of a VideoMamba; defaults are videomamba_tiny at 8 frames of 224 px."""

    reads_clips: ClassVar[bool] = True  # its input is (B, C, T, H, W); a distiller asks the config, not the family name
    upstream_container: ClassVar[str] = "model"  # OpenGVLab/VideoMamba reads `checkpoint['model']`

    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None  # None: ceil(embed_dim / 16), upstream's "auto"
    patch_size: int = 16
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    num_classes: int = 1000
    num_frames: int = 8
    tubelet: int = 1  # upstream `kernel_size`: frames per temporal token (the Conv3d's time kernel and stride)
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    drop_path_rate: float = 0.0  # upstream's constructor says 0.1, its training scripts set it per run

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            object.__setattr__(self, "img_size", (self.img_size, self.img_size))
        else:
            object.__setattr__(self, "img_size", tuple(self.img_size))
        for name in ("embed_dim", "depth", "d_state", "expand", "d_conv", "patch_size", "in_chans", "tubelet"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"VideoMambaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dt_rank is not None and self.dt_rank <= 0:
            raise ModelConfigError(f"VideoMambaConfig.dt_rank must be positive or None, got {self.dt_rank}")
        if self.num_classes < 0:
            raise ModelConfigError(f"VideoMambaConfig.num_classes must be >= 0, got {self.num_classes}")
        if len(self.img_size) != 2 or min(self.img_size) < self.patch_size:
            raise ModelConfigError(f"VideoMambaConfig: image {self.img_size} with patch {self.patch_size} has no patch")
        if self.num_frames <= 0 or self.num_frames % self.tubelet:
            raise ModelConfigError(
                f"VideoMambaConfig.num_frames must be a positive multiple of tubelet {self.tubelet}, "
                f"got {self.num_frames}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ModelConfigError(f"VideoMambaConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.embed_dim / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid of one frame (non-overlapping patches, remainder pixels dropped as the conv does)."""
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def for_teacher(
        self, *, img_size: tuple[int, int], patch_size: int, in_chans: int, num_classes: int, class_token: bool
    ) -> VideoMambaConfig:
        """This VideoMamba reading frames of an image teacher's size and predicting its classes (the converter's
        target adaptation). Frames, tubelet and the temporal table stay the registry's; the head always reads the cls
        token at 0 (upstream has no pooled variant), whether or not the teacher has one (`class_token`)."""
        return replace(self, img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes)

    @property
    def layer_config(self) -> VimConfig:
        """The config ViM's layer modules read: same widths and norm, directions summed (the fork has no /2)."""
        return VimConfig(
            embed_dim=self.embed_dim,
            depth=self.depth,
            d_state=self.d_state,
            expand=self.expand,
            d_conv=self.d_conv,
            dt_rank=self.dt_rank,
            norm_eps=self.norm_eps,
            residual_in_fp32=self.residual_in_fp32,
            divide_out=False,
        )

    def time_steps(self, frames: int | None = None) -> int:
        """Temporal tokens of a clip of `frames` frames (the config's num_frames by default): frames // tubelet."""
        frames = self.num_frames if frames is None else frames
        if frames <= 0 or frames % self.tubelet:
            raise ModelConfigError(f"VideoMamba takes a positive multiple of {self.tubelet} frames, got {frames}")
        return frames // self.tubelet

    def seq_len(self, frames: int | None = None) -> int:
        return 1 + self.time_steps(frames) * self.num_patches

    def frame_patch_indices(self, frames: int | None = None) -> torch.Tensor:
        """(T, P) LongTensor: the sequence index of time step t's patch p (raster order): 1 + t * P + p.

        This is how a distiller finds the token of (frame t, patch p); with tubelet k, time step t covers frames
        t*k .. t*k + k - 1.
        """
        steps = self.time_steps(frames)
        return 1 + torch.arange(steps * self.num_patches).reshape(steps, self.num_patches)

    def token_layout(self, frames: int | None = None) -> TokenLayout:
        """The sequence as one grid: the frames' patch grids stacked along the rows, (T * H, W), cls at 0.

        For one frame this is exactly an image layout, so `positions_in` pairs it with an image teacher's; for more
        frames use `frame_patch_indices` to pair each frame with the teacher's grid.
        """
        steps = self.time_steps(frames)
        rows, cols = self.grid
        patches = tuple(range(1, 1 + steps * self.num_patches))
        return TokenLayout(grid=(steps * rows, cols), cls_index=0, patch_indices=patches)


def inflate_image_kernel(weight2d: torch.Tensor, frames: int, mode: str = "center") -> torch.Tensor:
    """A 2-D patch kernel (D, C, kh, kw) as a 3-D one (D, C, frames, kh, kw), upstream's `inflate_weight`.

    "center" puts the kernel in the middle time slice (frames // 2) and zeros elsewhere, so a clip sees its middle
    frame as the image model would; "average" repeats it over time divided by `frames`, so a clip of identical frames
    gives exactly the image embedding.
    """
    if mode not in INFLATE_MODES:
        raise ModelConfigError(f"inflate mode must be one of {INFLATE_MODES}, got {mode!r}")
    if weight2d.dim() != 4 or frames <= 0:
        raise ModelConfigError(f"need a (D, C, kh, kw) kernel and frames >= 1, got {tuple(weight2d.shape)}, {frames}")
    if mode == "average":
        return weight2d.unsqueeze(2).repeat(1, 1, frames, 1, 1) / frames
    weight3d = weight2d.new_zeros((*weight2d.shape[:2], frames, *weight2d.shape[2:]))
    weight3d[:, :, frames // 2] = weight2d
    return weight3d


def resample_temporal_pos_embed(table: torch.Tensor, steps: int) -> torch.Tensor:
    """(1, T, D) -> (1, steps, D), linear over time with align_corners=False (upstream's fine-tuning loader)."""
    if table.shape[1] == steps:
        return table
    compute = torch.promote_types(table.dtype, torch.float32)
    resampled = F.interpolate(table.to(compute).transpose(1, 2), size=steps, mode="linear", align_corners=False)
    return resampled.transpose(1, 2).to(table.dtype)


class VideoMambaBlock(Block):
    """ViM's layer with VideoMamba's init, its norm registered after the mixer as upstream's Block does."""

    def __init__(
        self,
        cfg: VimConfig,
        drop_path: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(cfg, drop_path, device=device, dtype=dtype)
        self.cfg = cfg
        self.norm = self._modules.pop("norm")  # re-registering moves it behind the mixer (state_dict order)

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator | None) -> None:
        """Upstream init of one layer (the model draws its layers in order from one generator)."""
        self.norm.weight.fill_(1.0)
        _init_mixer(self.mixer, self.cfg, gen)


class PatchEmbed(nn.Module):
    """Conv3d patchify, kernel = stride = (tubelet, patch, patch); a clip (B, C, T, H, W) -> (B, T', P, D)."""

    def __init__(
        self, cfg: VideoMambaConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.cfg = cfg
        kernel = (cfg.tubelet, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel, stride=kernel, device=device, dtype=dtype)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        if tuple(clip.shape[-2:]) != self.cfg.img_size:
            got = tuple(clip.shape[-2:])
            raise ModelConfigError(f"VideoMamba expects {self.cfg.img_size} frames (its pos_embed grid), got {got}")
        self.cfg.time_steps(clip.shape[2])  # refuses a frame count the conv would silently truncate
        return self.proj(clip).flatten(3).permute(0, 2, 3, 1)


class VideoMamba(nn.Module):
    """OpenGVLab VideoMamba `VisionMamba` (video_sm), upstream-exact keys; takes clips (B, C, T, H, W) or images.

    `VideoMamba(cfg, device="meta")` allocates nothing and skips init: use it to read the key/shape table.
    """

    def __init__(
        self,
        cfg: VideoMambaConfig,
        *,
        seed: int | torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        kw = {"device": device, "dtype": dtype}
        d = cfg.embed_dim
        # Registration order reproduces upstream's state_dict order (own parameters first, then submodules).
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d, **kw))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, d, **kw))
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, cfg.time_steps(), d, **kw))
        self.head = nn.Linear(d, cfg.num_classes, **kw) if cfg.num_classes > 0 else nn.Identity()
        # Upstream drops layer i-1's mixer output with rate dpr[i-1] inside layer i (and the last one before norm_f):
        # the same as dropping layer i's output with dpr[i], which is what ViM's Block does.
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        layer_cfg = cfg.layer_config
        self.layers = nn.ModuleList(VideoMambaBlock(layer_cfg, rate, **kw) for rate in rates)
        self.norm_f = RMSNorm(d, cfg.norm_eps, **kw)
        if self.pos_embed.device.type != "meta":
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | torch.Generator | None = None) -> None:
        """Upstream's initialisation as its constructor leaves it, reproducible by seed (CPU draws, copied in).

        Upstream runs `self.apply(segm_init_weights)` over the whole model, then `_init_weights`: every Linear becomes
        trunc-normal(0.02) with a zero bias, the Conv3d keeps PyTorch's default, cls_token and temporal_pos_embedding
        stay zero, pos_embed is trunc-normal(0.02). See `_init_mixer` for what that does to the Mamba layers.
        """
        gen = seeded_generator(seed)
        conv = self.patch_embed.proj
        bound = 1.0 / math.sqrt(conv.weight[0].numel())  # PyTorch's Conv3d default: U(+-1/sqrt(fan_in)) for both
        init_on_cpu_(conv.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
        init_on_cpu_(conv.bias, nn.init.uniform_, gen, a=-bound, b=bound)
        self.cls_token.zero_()
        init_on_cpu_(self.pos_embed, nn.init.trunc_normal_, gen, std=0.02)
        self.temporal_pos_embedding.zero_()
        if isinstance(self.head, nn.Linear):
            init_on_cpu_(self.head.weight, nn.init.trunc_normal_, gen, std=0.02)
            self.head.bias.zero_()
        for layer in self.layers:
            layer.reset_parameters(gen)
        self.norm_f.weight.fill_(1.0)

    def token_layout(self, frames: int | None = None) -> TokenLayout:
        return self.cfg.token_layout(frames)

    def frame_patch_indices(self, frames: int | None = None) -> torch.Tensor:
        return self.cfg.frame_patch_indices(frames)

    def scan_orders(
        self, frames: int | None = None, device: torch.device | str | None = None
    ) -> dict[str, torch.Tensor]:
        """Per direction, the token visited at each scan step over the whole clip (fwd: 0..L-1, bwd: L-1..0)."""
        seq_len = self.cfg.seq_len(frames)
        return {d.name: d.order(seq_len, device) for d in VIM_DIRECTIONS}

    def no_weight_decay(self) -> set[str]:
        """The embeddings (upstream's `no_weight_decay`) and every A_log / D (marked `_no_weight_decay` in the fork)."""
        return {"pos_embed", "cls_token", "temporal_pos_embedding"} | ssm_no_decay(self)

    def _embed(self, video: torch.Tensor) -> torch.Tensor:
        """Clip or image -> (B, 1 + T' * P, D): cls + pos[0], then per time step its patches + pos + temporal."""
        if video.dim() == 4:
            video = video.unsqueeze(2)
        if video.dim() != 5:
            raise ModelConfigError(
                f"VideoMamba takes (B, C, T, H, W) clips or (B, C, H, W) images, got {video.dim()}-D"
            )
        patches = self.patch_embed(video)  # (B, T', P, D)
        temporal = resample_temporal_pos_embed(self.temporal_pos_embedding, patches.shape[1])
        patches = patches + self.pos_embed[:, None, 1:] + temporal[:, :, None]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches.flatten(1, 2)], dim=1)

    def forward_all(self, video: torch.Tensor, *, return_directions: bool = False) -> MambaOutput:
        """One pass returning logits, final normed tokens, the residual stream per layer, optional branch outputs."""
        residual, layer_tokens, directions = run_layers(
            self.layers,
            self._embed(video),
            self.cfg.residual_in_fp32,
            collect=True,
            return_directions=return_directions,
        )
        final_tokens = self.norm_f(residual)
        return MambaOutput(
            logits=self.head(final_tokens[:, 0]),
            final_tokens=final_tokens,
            layer_tokens=layer_tokens,
            directions=directions,
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        residual, _, _ = run_layers(self.layers, self._embed(video), self.cfg.residual_in_fp32)
        return self.head(self.norm_f(residual)[:, 0])


@torch.no_grad()
def _init_mixer(mixer: BiMambaMixer, cfg: VimConfig, gen: torch.Generator | None) -> None:
    """Mamba's init as VideoMamba's constructor leaves it, per direction.

    `segm_init_weights` redraws in_proj, x_proj and dt_proj as trunc-normal(0.02) with zero bias: Mamba's dt init
    (uniform dt_proj weight, log-uniform dt bias) is overwritten, so softplus(dt bias) = ln 2 on every channel.
    `_init_weights` then redraws out_proj kaiming-uniform(a=sqrt 5) / sqrt(depth); convs keep PyTorch's default,
    A = 1..N, D = 1.
    """
    n = cfg.d_state
    init_on_cpu_(mixer.in_proj.weight, nn.init.trunc_normal_, gen, std=0.02)
    for direction in mixer.directions:
        conv: nn.Conv1d = getattr(mixer, direction.param_name("conv1d"))
        init_on_cpu_(conv.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
        conv_bound = 1.0 / math.sqrt(cfg.d_conv)  # fan_in = 1 * K for the depthwise conv
        init_on_cpu_(conv.bias, nn.init.uniform_, gen, a=-conv_bound, b=conv_bound)
        init_on_cpu_(getattr(mixer, direction.param_name("x_proj")).weight, nn.init.trunc_normal_, gen, std=0.02)
        dt_proj: nn.Linear = getattr(mixer, direction.param_name("dt_proj"))
        init_on_cpu_(dt_proj.weight, nn.init.trunc_normal_, gen, std=0.02)
        dt_proj.bias.zero_()
        a_log = getattr(mixer, direction.param_name("A_log"))
        a_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.promote_types(a_log.dtype, torch.float32))))
        getattr(mixer, direction.param_name("D")).fill_(1.0)
    init_on_cpu_(mixer.out_proj.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
    mixer.out_proj.weight.div_(math.sqrt(cfg.depth))


register_family("videomamba", VideoMambaConfig, VideoMamba)
for _size, (_dim, _depth) in {"ti": (192, 24), "s": (384, 24), "m": (576, 32)}.items():
    # OpenGVLab/VideoMamba videomamba_{tiny,small,middle}: patch 16, 224 px, 8 frames, tubelet 1
    register(f"videomamba-{_size}", VideoMambaConfig(embed_dim=_dim, depth=_depth))
