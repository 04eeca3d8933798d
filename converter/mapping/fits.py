"""The fitted initialisers a mapping may name (`fit: <name>`): what each one makes and what it reads.

A fit makes every tensor of one student layer from one teacher sub-layer by least squares on calibration images:
the layer is given a fixed structure that the SSM mixer can express exactly, and the few numbers that structure leaves
free are solved so that the student layer, run on the teacher's own input, reproduces the teacher sub-layer's output
(`converter/convert/fit.py` does the solving; `docs/method.md` has the derivation). This module is the declaration
the mapping schema validates against and the planner asks: a fit's name, what it says it does, which teacher
sub-layer it reproduces, which index sets choose its channels, and which source tensors it reads (for the plan's
usage report and its list of dropped tensors), and which target families' layers it can build (the solver writes a
ViM bimamba layer; the planner refuses a fit in any other family's mapping).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FitSpec:
    name: str
    summary: str
    sublayer: str  # the teacher sub-layer the fitted student layer reproduces: "attn" or "mlp"
    sets: tuple[str, ...]  # index sets the fit reads: residual channels, and the per-block channels it keeps
    reads: tuple[str, ...]  # source tensors (templates in {block}) the fit may read; absent ones are skipped
    families: tuple[str, ...] = ("vim",)  # target families whose layer the solver builds (fit.py: ViM's mixer)


FITS: dict[str, FitSpec] = {
    spec.name: spec
    for spec in (
        FitSpec(
            "attention",
            "attention as a mean-field SSM: x <- V, out_proj <- O; per channel self + global-mean weights (D, dt) "
            "and the gate, constant and output projection fitted by least squares",
            "attn",
            ("residual", "value"),
            (
                "blocks.{block}.norm1.weight",
                "blocks.{block}.norm1.bias",
                "blocks.{block}.attn.qkv.weight",
                "blocks.{block}.attn.qkv.bias",
                "blocks.{block}.attn.proj.weight",
                "blocks.{block}.attn.proj.bias",
                "blocks.{block}.ls1.gamma",
            ),
        ),
        FitSpec(
            "mlp",
            "the MLP as a gated SSM layer: z <- fc1 (silu(1.702 a) ~ GELU), constant SSM path, out_proj <- fc2, "
            "biases and dropped units compensated by least squares",
            "mlp",
            ("residual", "hidden"),
            (
                "blocks.{block}.norm2.weight",
                "blocks.{block}.norm2.bias",
                "blocks.{block}.mlp.fc1.weight",
                "blocks.{block}.mlp.fc1.bias",
                "blocks.{block}.mlp.fc2.weight",
                "blocks.{block}.mlp.fc2.bias",
                "blocks.{block}.ls2.gamma",
            ),
        ),
    )
}
