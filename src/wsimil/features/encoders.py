"""Patch encoders behind one registry: ``create_encoder(name, weights=None) -> Encoder``.

Each entry is data (an :class:`EncoderSpec`): the timm architecture and its keyword arguments, the hub id, the
embedding width, the native input size, normalisation and the recommended precision. Weights come from a local
file (``weights=PATH``: safetensors or a PyTorch state dict, checked strictly), from the hub when asked
(``weights="hub"``; needs network access and, for gated models, a Hugging Face token), or, with no weights, from
a random initialisation with a fixed seed (reproducible; a warning says the features are meaningless).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from wsimil.errors import WsimilError

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    arch: str  # timm architecture name
    embed_dim: int
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]
    hub_id: str | None = None  # "hf-hub:org/name" for timm
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"  # recommended on GPU
    pooling: str = "token"  # token: the model's pooled output; cls_mean: concat(CLS, mean of patch tokens)
    note: str = ""


def _swiglu() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": torch.nn.SiLU}


ENCODERS: dict[str, EncoderSpec] = {}


def register_encoder(spec: EncoderSpec) -> EncoderSpec:
    if spec.name in ENCODERS:
        raise ValueError(f"encoder {spec.name!r} is registered twice")
    ENCODERS[spec.name] = spec
    return spec


for _spec in (
    EncoderSpec("resnet18", "resnet18", 512, hub_id="timm/resnet18.a1_in1k", note="ImageNet ResNet-18"),
    EncoderSpec(
        "resnet50_trunc",
        "resnet50",
        1024,
        hub_id="timm/resnet50.tv_in1k",
        note="CLAM's ImageNet ResNet-50 truncated after layer 3, average-pooled (1024-d)",
    ),
    EncoderSpec(
        "uni",
        "vit_large_patch16_224",
        1024,
        hub_id="hf-hub:MahmoodLab/UNI",
        timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True},
        precision="fp16",
        note="UNI (Chen et al. 2024), ViT-L/16",
    ),
    EncoderSpec(
        "uni2-h",
        "vit_giant_patch14_224",
        1536,
        hub_id="hf-hub:MahmoodLab/UNI2-h",
        timm_kwargs={
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            "swiglu": True,
        },
        precision="bf16",
        note="UNI2-h, ViT-H/14 with 8 register tokens",
    ),
    EncoderSpec(
        "virchow2",
        "vit_huge_patch14_224",
        2560,
        hub_id="hf-hub:paige-ai/Virchow2",
        timm_kwargs={
            "init_values": 1e-5,
            "mlp_ratio": 5.3375,
            "reg_tokens": 4,
            "global_pool": "",
            "dynamic_img_size": True,
            "swiglu": True,
        },
        precision="fp16",
        pooling="cls_mean",
        note="Virchow2: CLS ⊕ mean patch token (2560-d)",
    ),
    EncoderSpec(
        "h-optimus-0",
        "vit_giant_patch14_reg4_dinov2",
        1536,
        hub_id="hf-hub:bioptimus/H-optimus-0",
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
        precision="fp16",
        note="H-optimus-0, ViT-g/14 with 4 registers",
    ),
    EncoderSpec(
        "prov-gigapath",
        "vit_giant_patch14_dinov2",
        1536,
        hub_id="hf-hub:prov-gigapath/prov-gigapath",
        timm_kwargs={
            "patch_size": 16,
            "img_size": 224,
            "init_values": 1e-5,
            "mlp_ratio": 5.33334,
            "dynamic_img_size": True,
        },
        precision="fp16",
        note="Prov-GigaPath tile encoder, ViT-g/16",
    ),
    EncoderSpec(
        "phikon-v2",
        "vit_large_patch14_dinov2",
        1024,
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        precision="fp16",
        note="Phikon-v2 (DINOv2 ViT-L/14). Its official weights are in transformers format; pass a "
        "timm-format state dict with --encoder-weights",
    ),
):
    register_encoder(_spec)


def list_encoders() -> list[str]:
    return sorted(ENCODERS)


class TruncatedResNet(nn.Module):
    """ResNet-50 up to layer 3, then global average pooling (CLAM's ``resnet50_trunc``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        n = self.net
        x = n.maxpool(n.act1(n.bn1(n.conv1(x))))
        x = n.layer3(n.layer2(n.layer1(x)))
        return x.mean((2, 3))


class ClsMeanPool(nn.Module):
    """Concatenate the CLS token and the mean of the patch tokens (Virchow's embedding)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.net.forward_features(x)
        prefix = getattr(self.net, "num_prefix_tokens", 1)
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)


@dataclass
class Encoder:
    """A built encoder: ``model`` maps normalised ``(B, 3, S, S)`` to ``(B, embed_dim)``; ``preprocess`` maps
    uint8 patches ``(B, H, W, 3)`` to the model's input."""

    spec: EncoderSpec
    model: nn.Module
    weights: str  # "random(seed=…)", "hub:<id>" or the file path
    weights_sha256: str | None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def preprocess(self, patches: Tensor) -> Tensor:
        """uint8 ``(B, H, W, 3)`` → float ``(B, 3, S, S)``: resize (antialiased bilinear) and normalise."""
        x = patches.permute(0, 3, 1, 2).float().div_(255)
        s = self.spec.input_size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.spec.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def transforms_description(self) -> str:
        return f"resize {self.spec.input_size} bilinear-antialias; normalize mean={self.spec.mean} std={self.spec.std}"


def _build(spec: EncoderSpec, pretrained_hub: bool) -> nn.Module:
    import timm

    kw = dict(spec.timm_kwargs)
    if kw.pop("swiglu", False):
        kw.update(_swiglu())
    name = spec.hub_id if pretrained_hub else spec.arch
    if pretrained_hub and spec.hub_id and not spec.hub_id.startswith("hf-hub:"):
        name = f"hf-hub:{spec.hub_id}"
    net = timm.create_model(name, pretrained=pretrained_hub, num_classes=0, **kw)
    if spec.name == "resnet50_trunc":
        return TruncatedResNet(net)
    if spec.pooling == "cls_mean":
        return ClsMeanPool(net)
    return net


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _load_state(path: Path) -> dict[str, Tensor]:
    """A state dict from safetensors or a PyTorch file (read without running code), with one-line errors."""
    from wsimil.checkpoint import is_safetensors, is_torch_file, safe_torch_load

    pytorch = is_torch_file(path)
    if path.suffix == ".safetensors" or (not pytorch and is_safetensors(path)):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a damaged or foreign file
            raise WsimilError(f"encoder weights {path} are not a readable safetensors file ({e})") from None
    if not pytorch:
        raise WsimilError(f"encoder weights {path} are not a PyTorch checkpoint (torch.save) or a safetensors file")
    state = safe_torch_load(path, "encoder weights")
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WsimilError(
            f"encoder weights {path} hold a {type(state).__name__}, not a state dict (names → tensors); save "
            "model.state_dict() or a safetensors file"
        )
    return state


def create_encoder(name: str, weights: str | Path | None = None, seed: int = 0) -> Encoder:
    """Build a registered encoder. ``weights``: a file path, ``"hub"``, or ``None`` (random init from ``seed``)."""
    if name not in ENCODERS:
        raise WsimilError(f"unknown encoder {name!r}; available: {', '.join(list_encoders())}")
    spec = ENCODERS[name]
    if weights == "hub":
        if spec.hub_id is None:
            raise WsimilError(f"encoder {name!r} has no hub weights here; pass a weights file with --encoder-weights")
        try:
            model = _build(spec, pretrained_hub=True)
        except Exception as e:  # noqa: BLE001 - network, auth and hub errors
            raise WsimilError(
                f"cannot load {name!r} weights from the hub ({spec.hub_id}): {type(e).__name__}: {e}. Offline or "
                "gated? Download the weights once and pass the file with --encoder-weights PATH"
            ) from e
        return Encoder(spec, model.eval(), f"hub:{spec.hub_id}", None)
    torch.manual_seed(seed)
    model = _build(spec, pretrained_hub=False)
    if weights is None:
        warnings.warn(
            f"encoder {name!r} has no weights: randomly initialised (seed {seed}); features are "
            "reproducible but carry no pretrained knowledge. Pass --encoder-weights PATH or --encoder-weights hub.",
            stacklevel=2,
        )
        return Encoder(spec, model.eval(), f"random(seed={seed})", None)
    path = Path(weights)
    if not path.is_file():
        raise WsimilError(f"weights file {path} for encoder {name!r} does not exist")
    state = _load_state(path)
    target = model.net if isinstance(model, TruncatedResNet | ClsMeanPool) else model
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if isinstance(model, TruncatedResNet):
        state = {k: v for k, v in state.items() if not k.startswith(("layer4.", "fc."))}
        target_keys = {k for k in target.state_dict() if not k.startswith(("layer4.", "fc."))}
    else:
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc."))}
        target_keys = set(target.state_dict())
    missing, unexpected = target_keys - set(state), set(state) - set(target.state_dict())
    if missing or unexpected:
        raise WsimilError(
            f"weights {path} do not fit encoder {name!r} ({spec.arch}): {len(missing)} missing keys "
            f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})"
        )
    want = target.state_dict()
    shapes = [k for k in sorted(state) if tuple(state[k].shape) != tuple(want[k].shape)]
    if shapes:
        k = shapes[0]
        raise WsimilError(
            f"weights {path} do not fit encoder {name!r} ({spec.arch}): {len(shapes)} tensors have other shapes "
            f"(e.g. {k}: {tuple(state[k].shape)} in the file, {tuple(want[k].shape)} expected)"
        )
    try:
        target.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise WsimilError(f"weights {path} do not fit encoder {name!r}: {e}") from e
    return Encoder(spec, model.eval(), str(path.resolve()), sha256_file(path))
