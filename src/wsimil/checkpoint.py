"""Checkpoints that cannot run code: tensors in safetensors, everything else as JSON in the same file.

Bundles and runs travel between labs, so no file wsimil reads is ever unpickled with arbitrary globals.

* :func:`save_checkpoint` writes one ``.safetensors`` file. Every tensor (and numpy array) found anywhere in the
  nested dict/list structure is stored as a tensor under its path (``state_dict/attention.0.weight``); the
  structure itself, with those leaves replaced by ``{"__tensor__": path}``, goes into the header's metadata as JSON.
* :func:`load_checkpoint` reads it back. A checkpoint written by wsimil 0.1 (``torch.save`` of a dict) is read with
  :func:`safe_torch_load`: PyTorch's restricted unpickler, which accepts tensors, plain containers and numpy arrays
  and refuses every other global with one line instead of running it.
* :func:`safe_torch_load` is also the one way wsimil reads ``.pt`` files from others (weights, CLAM/TRIDENT
  feature bags).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsimil.errors import WsimilError
from wsimil.io import atomic_path

#: format marker stored in the safetensors metadata
CHECKPOINT_FORMAT = "wsimil-checkpoint-1"
_META_KEY = "wsimil"
_TENSOR = "__tensor__"
_NUMPY = "__numpy__"


def _numpy_globals() -> list[Any]:
    """numpy's array/scalar reconstruction functions and dtype classes: data, not code paths an attacker can steer."""
    out: list[Any] = [np.ndarray, np.dtype]
    for mod_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            mod = __import__(mod_name, fromlist=["_reconstruct", "scalar"])
        except ImportError:
            continue
        out += [mod._reconstruct, mod.scalar]
        break
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return out


def safe_torch_load(path: str | Path, what: str = "file") -> Any:
    """``torch.load`` with ``weights_only=True`` (tensors, plain containers, numpy arrays only).

    Anything else (a pickled class, a function, a ``__reduce__`` payload) is refused with one :class:`WsimilError`
    line before it can run; a file that is not a PyTorch file at all gets one line too."""
    path = Path(path)
    if not path.is_file():
        raise WsimilError(f"{what} {path} does not exist")
    if not is_torch_file(path):
        raise WsimilError(f"{what} {path} is not a PyTorch file (neither a torch.save archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        glob = _unsupported_global(str(e))
        if glob:
            raise WsimilError(
                f"refused to load {what} {path}: it holds Python objects other than tensors and plain data "
                f"({glob}), and loading those could run code; only use files from sources you trust, saved as "
                "safetensors or plain tensors"
            ) from None
        raise WsimilError(f"{what} {path} is not a PyTorch file wsimil can read ({_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file; none is a user's bug
        raise WsimilError(f"{what} {path} is not a PyTorch file wsimil can read ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    """The informative line of torch's long weights-only message (it starts with advice about weights_only)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Unpickler error:", "PytorchStreamReader", "invalid load key", "unexpected EOF")):
            return ln.rstrip(".")
    return lines[0] if lines else type(e).__name__


def _unsupported_global(text: str) -> str:
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("Unsupported global:") or "unsupported GLOBAL" in line:
            return line.rstrip(".")
    return ""


# ---------------------------------------------------------------- safetensors round trip
def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {_TENSOR: prefix}
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj.tolist())]
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj))
        return {_TENSOR: prefix, _NUMPY: True}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint keys must be strings, got {k!r} at {prefix or '/'}")
            out[k] = _flatten(v, f"{prefix}/{k}" if prefix else k, tensors)
        return out
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {prefix or '/'})")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj and set(obj) <= {_TENSOR, _NUMPY}:
            t = tensors[obj[_TENSOR]]
            return t.numpy() if obj.get(_NUMPY) else t
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """Write ``obj`` (nested dicts/lists of tensors, numpy arrays and JSON values) atomically as safetensors."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(obj, "", tensors)
    # safetensors refuses tensors that share memory (tied weights); store independent copies
    tensors = {k: v.clone() for k, v in tensors.items()}
    meta = {_META_KEY: json.dumps({"format": CHECKPOINT_FORMAT, "tree": tree})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def is_torch_file(path: str | Path) -> bool:
    """True when ``path`` starts like a ``torch.save`` file: a zip archive, or (legacy format) a pickle."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def is_safetensors(path: str | Path) -> bool:
    """True when ``path`` starts like a safetensors file (8-byte header length, then a JSON object)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < (1 << 30)


def load_checkpoint(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (or, safely, by wsimil 0.1's ``torch.save``)."""
    path = Path(path)
    if not path.is_file():
        raise WsimilError(f"{what} {path} does not exist")
    if not is_safetensors(path):
        if path.suffix == SUFFIX:
            raise WsimilError(f"refused to load {what} {path}: it is not a safetensors file (damaged, or replaced)")
        ck = safe_torch_load(path, what)
        if not isinstance(ck, dict):
            raise WsimilError(f"{what} {path} does not hold a wsimil checkpoint (found a {type(ck).__name__})")
        return ck
    from safetensors import SafetensorError
    from safetensors.torch import load

    # read into memory (not memory-mapped): a file replaced while its tensors are in use must not fault
    data = path.read_bytes()
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        tensors = load(data)
    except (SafetensorError, ValueError, AttributeError) as e:
        raise WsimilError(f"{what} {path} is damaged or not a safetensors file ({_reason(e)})") from None
    if _META_KEY not in meta:
        raise WsimilError(f"{what} {path} is a safetensors file but not a wsimil checkpoint (no '{_META_KEY}' entry)")
    try:
        doc = json.loads(meta[_META_KEY])
        return _unflatten(doc["tree"], tensors)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise WsimilError(f"{what} {path} has a damaged header ({_reason(e)})") from None


# ---------------------------------------------------------------- where fold checkpoints live
#: suffix of every checkpoint wsimil writes; ``.pt`` files are wsimil 0.1 checkpoints, still read (safely)
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"


def fold_checkpoint(folder: str | Path, repeat: int, fold: int) -> Path:
    """The checkpoint of one fold in ``folder``: ``repeat{r}_fold{k}.safetensors``, or the wsimil 0.1
    ``repeat{r}_fold{k}.pt`` when only that exists (read through :func:`load_checkpoint`'s safe path)."""
    path = Path(folder) / f"repeat{int(repeat)}_fold{int(fold)}{SUFFIX}"
    legacy = path.with_suffix(LEGACY_SUFFIX)
    return legacy if not path.is_file() and legacy.is_file() else path


def fold_checkpoints(folder: str | Path) -> list[Path]:
    """Every fold checkpoint in ``folder`` (one per fold; the safetensors file wins over a legacy ``.pt``)."""
    folder = Path(folder)
    stems = sorted({p.stem for suffix in (SUFFIX, LEGACY_SUFFIX) for p in folder.glob(f"repeat*_fold*{suffix}")})
    out = []
    for stem in stems:
        new = folder / f"{stem}{SUFFIX}"
        out.append(new if new.is_file() else folder / f"{stem}{LEGACY_SUFFIX}")
    return out
