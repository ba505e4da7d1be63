"""Intermediate outputs of a patch encoder through timm's ``forward_intermediates``, so CNNs and ViTs share one path.

For block ``l`` of an encoder (a timm ``feature_info`` entry: a ResNet stage incl. the stem, a ViT block) we need
two views (SPEC §1 stage 1):

- the **spatial grid** ``S_l (B, C_l, h_l, w_l)``: a CNN's feature map, a ViT's patch tokens as a map (prefix tokens
  dropped);
- the **summary token** ``T_l (B, C_l)``: a ViT's CLS token after the block (the mean patch token if the model has
  no CLS token), a CNN's globally average-pooled map.

plus the encoder's **final embedding** ``(B, D)``, identical to ``encoder.model(x)`` (checked in the tests). Block
outputs are taken raw (timm's ``norm=False``), as the official code does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from wsimil.errors import WsimilError
from wsimil.features.encoders import ClsMeanPool, Encoder, TruncatedResNet

#: blocks of CLAM's truncated ResNet-50: stem, layer1, layer2, layer3 (its embedding is layer3 average-pooled)
TRUNCATED_RESNET_BLOCKS = 4


@dataclass
class TapOutput:
    """``final (B, D)``; per requested block: ``grids[i] (B, C_i, h_i, w_i)`` and ``summaries[i] (B, C_i)``."""

    final: Tensor
    grids: list[Tensor]
    summaries: list[Tensor]


def timm_net(model: nn.Module) -> nn.Module:
    """The timm model inside an encoder's ``model`` (wsimil wraps some in a pooling module)."""
    return model.net if isinstance(model, TruncatedResNet | ClsMeanPool) else model


def is_vit(model: nn.Module) -> bool:
    return hasattr(timm_net(model), "patch_embed")


def token_stride(model: nn.Module) -> int | None:
    """Pixels per token of a ViT's patch embedding (``None`` for CNNs)."""
    if not is_vit(model):
        return None
    ps = timm_net(model).patch_embed.patch_size
    return int(ps[0] if isinstance(ps, tuple | list) else ps)


def student_input_size(model: nn.Module, patch_size: int, factor: int) -> int:
    """Default student input for LR patches of ``patch_size`` px: the patch size itself for CNNs; for ViTs the
    nearest size whose token grid ``factor`` divides, so each HR child owns a whole block of tokens (ViT-B/16 at
    256 px: 256, a 16×16 grid; a patch-14 ViT such as UNI2-h or Virchow2: 280, 20×20, not 256, whose 18×18 grid
    would split tokens between children)."""
    p = token_stride(model)
    if p is None:
        return patch_size
    unit = p * factor
    return max(unit, int(round(patch_size / unit)) * unit)


def check_student_input(model: nn.Module, input_size: int, factor: int) -> str | None:
    """Why ``input_size`` misaligns a ViT's token grid with the ``factor × factor`` HR children, or ``None``."""
    p = token_stride(model)
    if p is None or (input_size // p) % factor == 0:
        return None
    return (
        f"student input {input_size} px gives a {input_size // p}x{input_size // p} token grid (patch {p}), which "
        f"does not split into {factor}x{factor} whole blocks: tokens are shared between HR children; use a multiple "
        f"of {p * factor} px (e.g. {student_input_size(model, input_size, factor)})"
    )


def n_blocks(model: nn.Module) -> int:
    """How many blocks ``forward_intermediates`` can tap (timm ``feature_info`` entries)."""
    if isinstance(model, TruncatedResNet):
        return TRUNCATED_RESNET_BLOCKS
    info = getattr(timm_net(model), "feature_info", None)
    if not info:
        raise WsimilError(f"encoder model {type(model).__name__} has no timm feature_info; cannot tap its blocks")
    return len(info)


def block_widths(model: nn.Module) -> list[int]:
    """Channel width ``C_l`` of every tappable block."""
    info = timm_net(model).feature_info
    return [int(info[i]["num_chs"]) for i in range(n_blocks(model))]


def default_layers(n: int) -> tuple[int, ...]:
    """SPEC §1 default ``K``: the first, second and last-but-one block (``(0, 1, 10)`` for a 12-block ViT-B)."""
    if n < 1:
        raise WsimilError("an encoder with no blocks cannot be distilled layer-wise")
    return tuple(sorted({0, min(1, n - 1), max(n - 2, 0)}))


def check_layers(layers: tuple[int, ...] | list[int], n: int, who: str = "encoder") -> tuple[int, ...]:
    """Validate block indices (negative ones count from the end) and return them non-negative, in given order."""
    out = []
    for layer in layers:
        i = int(layer) + n if int(layer) < 0 else int(layer)
        if not 0 <= i < n:
            raise WsimilError(f"layer {layer} does not exist: the {who} has {n} blocks (0..{n - 1})")
        out.append(i)
    return tuple(out)


def forward_taps(model: nn.Module, x: Tensor, layers: tuple[int, ...] | list[int]) -> TapOutput:
    """Run ``model`` once on normalised ``x (B, 3, S, S)`` and return its final embedding and, for each block in
    ``layers``, the spatial grid and the summary token (see the module docstring)."""
    net = timm_net(model)
    want = sorted(set(layers))
    if isinstance(model, TruncatedResNet):
        idx = sorted(set(want) | {TRUNCATED_RESNET_BLOCKS - 1})
        maps = dict(zip(idx, net.forward_intermediates(x, indices=idx, intermediates_only=True), strict=True))
        final = maps[TRUNCATED_RESNET_BLOCKS - 1].mean((2, 3))
        grids = [maps[i] for i in layers]
        return TapOutput(final, grids, [g.mean((2, 3)) for g in grids])
    if is_vit(model):
        last, inter = net.forward_intermediates(x, indices=want, return_prefix_tokens=True)
        by_index = dict(zip(want, inter, strict=True))
        grids = [by_index[i][0] for i in layers]
        has_cls = getattr(net, "cls_token", None) is not None
        summaries = [by_index[i][1][:, 0] if has_cls else by_index[i][0].mean((2, 3)) for i in layers]
        if isinstance(model, ClsMeanPool):
            prefix = getattr(net, "num_prefix_tokens", 1)
            final = torch.cat([last[:, 0], last[:, prefix:].mean(1)], dim=-1)
        else:
            final = net.forward_head(last)
        return TapOutput(final, grids, summaries)
    last, inter = net.forward_intermediates(x, indices=want)
    by_index = dict(zip(want, inter, strict=True))
    grids = [by_index[i] for i in layers]
    return TapOutput(net.forward_head(last), grids, [g.mean((2, 3)) for g in grids])


def make_student(teacher: Encoder, input_size: int) -> Encoder:
    """The stage-1 student ``E_S``: a deep copy of the teacher's model (same weights), working at ``input_size``
    pixels (the LR patch size, SPEC §1: a 256-px LR input gives ViT-B/16 a 16×16 grid).

    ViT position embeddings are interpolated to the new grid **[SPEC decision; the official code slices them]**:
    models built with ``dynamic_img_size`` interpolate on the fly, others are resized once with timm's
    ``set_input_size``. The teacher is left untouched."""
    from dataclasses import replace

    model = copy.deepcopy(teacher.model)
    net = timm_net(model)
    if is_vit(model) and not getattr(net, "dynamic_img_size", False):
        net.set_input_size(img_size=(input_size, input_size))
    spec = replace(teacher.spec, input_size=input_size)
    return Encoder(spec, model, f"lrmil-student-of({teacher.weights})", None)


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the frozen teacher ``E_T``."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def undistilled_lr_encoder(teacher: Encoder, input_size: int) -> Encoder:
    """The teacher encoder at the LR input size (the student before stage 1); the teacher itself if sizes agree."""
    if input_size == teacher.spec.input_size:
        return teacher
    enc = make_student(teacher, input_size)
    enc.weights, enc.weights_sha256 = teacher.weights, teacher.weights_sha256  # the teacher's weights, unchanged
    return enc


def undistilled_attrs(teacher: Encoder, input_size: int) -> dict:
    """Feature provenance of :func:`undistilled_lr_encoder`: at a size other than the registry's, the encoder is
    named ``{name}@{size}px`` (not a registry entry, so a bundle trained on these features scores feature folders,
    and ``wsimil predict`` does not rebuild the encoder at the wrong size)."""
    if input_size == teacher.spec.input_size:
        return {"lrmil_input_size": input_size}
    return {"encoder": f"{teacher.name}@{input_size}px", "lrmil_input_size": input_size}
