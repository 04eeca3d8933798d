"""Fitted layers: each student layer made from one teacher sub-layer by least squares on calibration images.

A ViM layer cannot copy an attention sub-layer (softmax over tokens has no SSM counterpart) and has no biases, so
plain copying loses most of a real teacher's function (docs/method.md, "Interleaved, fitted layers"). Instead each
fitted layer gets a fixed structure the mixer computes exactly, and its free numbers are solved so that the layer,
run on the teacher's own input, reproduces the teacher sub-layer's output:

- the gate `silu(z)` is made constant: z = K * (beta . h), beta the least-squares direction with beta . h ~ 1
  (ViT residual streams have one, measured within 2-5 % after the first block);
- one channel is a constant (its conv has no taps and a bias): with x_proj reading only it, B and C are constant,
  so with A ~ 0 the two scans sum every token: the mixer holds a global mean at no cost;
- attention (`fit: attention`): x <- the value map (least squares from the student's normalised input to the
  teacher's values), conv passes x through (shifted into silu's near-linear range), and per value channel
  `y = a * u_t + b * mean(u) + c` is solved (D and dt carry a and b); this mean-field form keeps ~0.9 of each
  attention sub-layer of DINOv2 (update cosine);
- MLP (`fit: mlp`): every SSM input is the constant, so y = silu(z) with z <- 1.702 * fc1 pre-activations of the
  kept hidden units (x * sigmoid(1.702 x) ~ GELU(x));
- out_proj: least squares from what the mixer actually computes (the model's own `mixed`) to the teacher sub-layer's
  output (LayerScale, biases and the units a narrower student drops all compensated at once).

Statistics are accumulated as Gram matrices in float64 over batches, so the number of images costs time, not memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmconvert.converter.errors import ConfigError
from tmconvert.converter.mapping.fits import FITS
from tmconvert.models import VisionTransformer
from tmconvert.models.init import seeded_generator
from tmconvert.models.vim import Block as VimBlock

# Scales chosen so every fitted weight has the size of ViM's own init (~1/sqrt(D)): AdamW moves each weight by about
# the learning rate per step whatever its size, so a structure built from tiny weights is erased by the first steps of
# distillation (measured: a fitted ViM-S whose values were scaled to std 0.1 and gated at 8 fell from 70 % to 48 %
# top-1 in 117 steps at lr 1e-4).
GATE = 1.2785  # z = GATE * (beta . h): silu(1.2785) = 1, so the gate passes its channel on at unit scale
CONST_BIAS = 1.0  # the constant channel's conv bias: u = silu(1)
X_STD = 0.5  # value channels are scaled to this std ...
X_SHIFT = 2.5  # ... around this conv bias, where silu is close to linear (slope 1.00-1.08 over +-2 std)
A_LOG = math.log(1e-4)  # A = -1e-4: no decay over an image's tokens
DT_FLOOR = 1e-4  # dt of channels whose scan must not accumulate
GELU_SILU = 1.702  # GELU(x) ~ x * sigmoid(1.702 x) = silu(1.702 x) / 1.702
RIDGE = 1e-4  # relative ridge: lambda = RIDGE * mean diagonal of the Gram matrix
# The structure leaves many weights at zero in pairs whose gradients are then zero too (a channel with no input and no
# gate, B and C rows both zero, dt_proj against its x_proj rows): training could never use them. Those weights get
# this fraction of their ViM init instead, which changes the fitted function only at second or third order.
RESIDUE = 0.1


@dataclass(frozen=True)
class LayerFit:
    """One fitted student layer: which teacher block and sub-layer it reproduces, and the channels it keeps."""

    layer: int
    block: int
    fit: str  # a name in FITS
    residual: torch.Tensor  # the student's residual channels among the teacher's (sorted)
    kept: torch.Tensor  # value channels (attention) or hidden units (MLP) of the teacher block (sorted)


class _Gram:
    """X^T X and X^T Y accumulated in float64 over batches of rows."""

    def __init__(self) -> None:
        self.xx: torch.Tensor | None = None
        self.xy: torch.Tensor | None = None
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
        xx, xy = x.T @ x, x.T @ y
        self.xx = xx if self.xx is None else self.xx + xx
        self.xy = xy if self.xy is None else self.xy + xy
        self.rows += x.shape[0]

    def solve(self) -> torch.Tensor:
        """The ridge solution W (in, out) of X W ~ Y."""
        assert self.xx is not None and self.xy is not None
        ridge = RIDGE * self.xx.diagonal().mean().clamp(min=1e-12)
        eye = torch.eye(self.xx.shape[0], dtype=torch.float64, device=self.xx.device)
        return torch.linalg.solve(self.xx + ridge * eye, self.xy)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _inv_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


@dataclass
class _Streams:
    """One calibration batch at one teacher block, restricted to the tokens the student has."""

    block_in: torch.Tensor  # (B, T, D) stream entering the block
    mid: torch.Tensor  # (B, T, D) after the attention sub-layer
    block_out: torch.Tensor  # (B, T, D) after the MLP sub-layer
    value: torch.Tensor  # (B, T, D) the attention's values, heads concatenated
    attended: torch.Tensor  # (B, T, D) softmax(QK^T) V, heads concatenated (what attn.proj reads)
    pre_act: torch.Tensor  # (B, T, H) fc1 output (before GELU)


def _teacher_streams(
    teacher: VisionTransformer, images: torch.Tensor, tokens: torch.Tensor, blocks: int
) -> list[_Streams]:
    """The first `blocks` blocks of the teacher, unrolled so attention is computed once for both its output and the
    attended values the fit reads; every stream keeps only `tokens` (the ones the student has)."""
    out: list[_Streams] = []
    x = teacher._embed(images)
    for block in teacher.blocks[:blocks]:
        b, t, d = x.shape
        qkv = block.attn.qkv(block.norm1(x)).reshape(b, t, 3, block.attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        mid = x + block.ls1(block.attn.proj(attended))
        pre_act = block.mlp.fc1(block.norm2(mid))
        after = mid + block.ls2(block.mlp.fc2(block.mlp.act(pre_act)))
        value = v.transpose(1, 2).reshape(b, t, d)
        out.append(_Streams(*(s.index_select(1, tokens) for s in (x, mid, after, value, attended, pre_act))))
        x = after
    return out


class _Solver:
    """The structure of one fitted layer and the numbers solved for it, as the student layer's tensors."""

    def __init__(self, spec: LayerFit, cfg: object, norm_eps: float, seq_len: int, device: torch.device):
        self.spec, self.cfg, self.eps, self.seq_len = spec, cfg, norm_eps, seq_len
        self.block = VimBlock(cfg, 0.0, device=device)  # type: ignore[arg-type]
        self.spec = dataclasses.replace(spec, residual=spec.residual.to(device), kept=spec.kept.to(device))
        self.mixer = self.block.mixer
        self.e, self.n, self.r = self.mixer.d_inner, self.mixer.d_state, self.mixer.dt_rank
        self.m = spec.kept.numel()
        self.h_in = _Gram()  # student input -> values / pre-activations, and -> 1 (beta)
        self.coef: torch.Tensor | None = None  # attention: per value channel 3x3 systems
        self.coef_rhs: torch.Tensor | None = None
        self.out = _Gram()  # mixed -> teacher sub-layer output

    # -- what each pass reads of the teacher
    def _input(self, s: _Streams) -> torch.Tensor:
        stream = s.block_in if FITS[self.spec.fit].sublayer == "attn" else s.mid
        return stream.index_select(-1, self.spec.residual)

    def _target_in(self, s: _Streams) -> torch.Tensor:
        if FITS[self.spec.fit].sublayer == "attn":
            return s.value.index_select(-1, self.spec.kept)
        return s.pre_act.index_select(-1, self.spec.kept)

    def _update(self, s: _Streams) -> torch.Tensor:
        before, after = (s.block_in, s.mid) if FITS[self.spec.fit].sublayer == "attn" else (s.mid, s.block_out)
        return (after - before).index_select(-1, self.spec.residual)

    def normed(self, s: _Streams) -> torch.Tensor:
        return _rms(self._input(s).float(), self.eps)

    # -- pass 1: input maps
    def add_inputs(self, s: _Streams) -> None:
        h = self.normed(s)
        self.h_in.add(h, torch.cat([self._target_in(s), torch.ones_like(h[..., :1])], -1))

    def solve_inputs(self) -> None:
        solution = self.h_in.solve()  # (D_s, m + 1)
        maps, beta = solution[:, : self.m], solution[:, self.m]
        with torch.no_grad():
            p = self.mixer
            kw = {"dtype": torch.float64, "device": solution.device}
            w_in = torch.zeros(2 * self.e, solution.shape[0], **kw)
            gate_rows = slice(self.e, self.e + self.m + 1)
            w_in[gate_rows] = GATE * beta
            conv = torch.zeros(self.e, p.conv1d.weight.shape[-1], **kw)
            bias = torch.zeros(self.e, **kw)
            if self.spec.fit == "attention":
                # x rows: the value map scaled to X_STD per channel (std from the Gram matrices: w^T G w / n - mean^2)
                gram, rows = self.h_in.xx, self.h_in.rows
                mean = (maps * self.h_in.xy[:, self.m : self.m + 1]).sum(0) / rows  # h^T 1 = xy's last column
                var = ((maps * (gram @ maps)).sum(0) / rows - mean.pow(2)).clamp(min=1e-12)
                w_in[: self.m] = (maps * (X_STD / var.sqrt())).T
                conv[: self.m, -1] = 1.0
                bias[: self.m] = X_SHIFT
                bias[self.m] = CONST_BIAS
            else:
                w_in[self.e : self.e + self.m] = GELU_SILU * maps.T
                bias[:] = CONST_BIAS
            p.in_proj.weight.copy_(w_in)
            u0 = F.silu(torch.tensor(CONST_BIAS, dtype=torch.float64))
            x_proj = torch.zeros(self.r + 2 * self.n, self.e, **kw)
            if self.spec.fit == "attention":
                x_proj[self.r, self.m] = 1.0 / u0  # B_0 = 1
                x_proj[self.r + self.n, self.m] = 1.0 / u0  # C_0 = 1
            for direction in p.directions:
                getattr(p, direction.param_name("conv1d")).weight.copy_(conv[:, None, :])
                getattr(p, direction.param_name("conv1d")).bias.copy_(bias)
                getattr(p, direction.param_name("x_proj")).weight.copy_(x_proj)
                getattr(p, direction.param_name("dt_proj")).weight.zero_()
                getattr(p, direction.param_name("A_log")).fill_(A_LOG)
            self._set_mixing(torch.zeros(self.m, **kw), torch.zeros(self.m, **kw))
            self.block.norm.weight.fill_(1.0)

    def _set_mixing(self, self_weight: torch.Tensor, mean_weight: torch.Tensor) -> None:
        """Per value channel y = self_weight * u_t + mean_weight * mean(u): both scans sum all tokens with weight
        dt / 2 each (so dt = 2 b / L) and count the current one once more, which D takes back."""
        p, length = self.mixer, self.seq_len
        dt = torch.full((self.e,), DT_FLOOR, dtype=torch.float64, device=self_weight.device)
        d_skip = torch.ones_like(dt)
        if self.spec.fit == "attention":
            dt[: self.m] = (2.0 * mean_weight / length).clamp(min=DT_FLOOR)
            d_skip[: self.m] = self_weight - dt[: self.m] / 2.0
        with torch.no_grad():
            for direction in p.directions:
                getattr(p, direction.param_name("dt_proj")).bias.copy_(_inv_softplus(dt))
                getattr(p, direction.param_name("D")).copy_(d_skip)

    # -- pass 2 (attention only): self and mean weights per value channel
    def add_mixing(self, s: _Streams) -> None:
        if self.spec.fit != "attention":
            return
        h = self.normed(s)
        xz = h @ self.mixer.in_proj.weight.T.float()
        u = F.silu(xz[..., : self.m] + self.mixer.conv1d.bias[: self.m]).double()
        gate = F.silu(xz[..., self.e + self.m : self.e + self.m + 1]).double()
        feats = torch.stack([gate * u, gate * u.mean(1, keepdim=True).expand_as(u), gate.expand_as(u)], -1)
        feats = feats.reshape(-1, self.m, 3).transpose(0, 1)  # (m, rows, 3)
        target = s.attended.index_select(-1, self.spec.kept).double().reshape(-1, self.m).T[..., None]
        xx, xy = feats.transpose(1, 2) @ feats, feats.transpose(1, 2) @ target
        self.coef = xx if self.coef is None else self.coef + xx
        self.coef_rhs = xy if self.coef_rhs is None else self.coef_rhs + xy

    def solve_mixing(self) -> None:
        if self.spec.fit != "attention":
            return
        assert self.coef is not None and self.coef_rhs is not None
        ridge = RIDGE * self.coef.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)
        eye = torch.eye(3, dtype=torch.float64, device=self.coef.device)
        solution = torch.linalg.solve(self.coef + ridge[:, None, None] * eye, self.coef_rhs)[..., 0]
        self._set_mixing(solution[:, 0], solution[:, 1])

    # -- last pass: out_proj
    def mixed(self, h: torch.Tensor) -> torch.Tensor:
        """What the mixer computes before out_proj for these parameters, in closed form: conv taps are identities or
        absent, B and C are constant and A ~ 0, so each scan is a running sum (equal to the model's `mixed` to
        ~1e-6, tests/test_fit.py; a scan per layer and batch would cost ~100x more)."""
        p = self.mixer
        xz = h @ p.in_proj.weight.T
        x, z = xz[..., : self.e], xz[..., self.e :]
        u = F.silu(x + p.conv1d.bias) if self.spec.fit == "attention" else F.silu(p.conv1d.bias).expand_as(x)
        dt = F.softplus(p.dt_proj.bias)
        d_skip = p.D
        total = u.sum(1, keepdim=True) if self.spec.fit == "attention" else torch.zeros_like(u[:, :1])
        # B = C = e_0 / u0 on the constant channel only: B.C u0^2 / u0^2 = 1 for the attention fit, 0 otherwise
        y = dt / 2 * (total + u) + d_skip * u if self.spec.fit == "attention" else d_skip * u
        return y * F.silu(z)

    def add_output(self, s: _Streams) -> None:
        with torch.no_grad():
            mixed = self.mixed(self.normed(s))[..., : self.m + 1]
        self.out.add(mixed, self._update(s))

    def solve_output(self) -> None:
        w_out = torch.zeros(self.mixer.out_proj.weight.shape, dtype=torch.float64, device=self.out.xx.device)
        w_out[:, : self.m + 1] = self.out.solve().T
        with torch.no_grad():
            self.mixer.out_proj.weight.copy_(w_out)

    # -- after the solve: room to learn
    def add_residue(self, gen: torch.Generator, scale: float = RESIDUE) -> None:
        """Give the weights the structure leaves dead (`RESIDUE`) `scale` x their ViM init, and the SSM states and
        channels the fit does not use ViM's A and dt. Kept exact: the value channels' conv taps (they train as they
        are) and the B_0 / C_0 rows of the global sum."""
        init = VimBlock(self.cfg, 0.0)  # type: ignore[arg-type]
        init.reset_parameters(gen)
        reference = init.state_dict()
        attention = self.spec.fit == "attention"
        used = self.m + 1 if attention else 0  # channels whose dt and state 0 the fit set
        with torch.no_grad():
            for name, tensor in self.block.state_dict().items():
                ref = reference[name].to(tensor)
                leaf = name.rsplit(".", 1)[-1]
                if leaf.startswith("A") and leaf.endswith("_log"):
                    tensor[:, 1:] = ref[:, 1:]
                    tensor[used:, 0] = ref[used:, 0]
                elif "dt_proj" in name and leaf == "bias":
                    tensor[used:] = ref[used:]
                elif leaf == "weight" and not name.startswith("norm"):
                    dead = tensor == 0
                    if attention and "conv1d" in name:
                        dead[: self.m] = False
                    if attention and "x_proj" in name:
                        dead[[self.r, self.r + self.n]] = False
                    tensor[dead] = scale * ref[dead]

    def tensors(self) -> dict[str, torch.Tensor]:
        prefix = f"layers.{self.spec.layer}."
        return {prefix + name: t.detach().float().cpu().clone() for name, t in self.block.state_dict().items()}


def fit_layers(
    teacher: VisionTransformer,
    fits: Sequence[LayerFit],
    batches: Sequence[torch.Tensor],
    target_cfg: object,
    *,
    seed: int = 0,
    residue: float | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Every tensor of every fitted layer (`layers.{j}.*`, float32), solved on `batches` of teacher-ready images.

    Up to three passes over the images (inputs; the attention layers' mixing weights, when there are any; out_proj),
    each a teacher forward up to the last fitted block; statistics only are kept between batches. Then the weights
    the structure leaves dead get `residue` (default `RESIDUE`) x their ViM init (`_Solver.add_residue`, drawn from
    `seed`).
    """
    residue = RESIDUE if residue is None else residue
    patch = teacher.cfg.patch_size
    height, width = batches[0].shape[-2:]
    layout = teacher.cfg.token_layout((height // patch, width // patch))
    kept = ([layout.cls_index] if layout.cls_index is not None else []) + list(layout.patch_indices)
    device = torch.device(device)
    tokens = torch.tensor(kept, dtype=torch.long, device=device)  # the teacher's tokens the student has
    if not target_cfg.divide_out:  # type: ignore[attr-defined]
        raise ConfigError("fitted layers assume a ViM that averages its two scan directions (divide_out: true)")
    eps, seq_len = target_cfg.norm_eps, target_cfg.seq_len  # type: ignore[attr-defined]
    solvers = [_Solver(f, target_cfg, eps, seq_len, device) for f in fits]
    teacher = teacher.float().eval().to(device)
    blocks = 1 + max(f.block for f in fits)
    stages = ["inputs", "mixing", "output"]
    if not any(f.fit == "attention" for f in fits):
        stages.remove("mixing")
    for stage in stages:
        with torch.no_grad():
            for images in batches:
                streams = _teacher_streams(teacher, images.to(device).float(), tokens, blocks)
                for solver in solvers:
                    getattr(solver, f"add_{stage}")(streams[solver.spec.block])
        for solver in solvers:
            getattr(solver, f"solve_{stage}")()
    for solver in solvers:
        solver.add_residue(seeded_generator(seed * 1_000_003 + solver.spec.layer), residue)
    return {name: tensor for solver in solvers for name, tensor in solver.tensors().items()}
