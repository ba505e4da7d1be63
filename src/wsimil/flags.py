"""One meaning per flag name across commands, and the old spellings kept for one release.

The vocabulary every command uses:

- ``--encoder-weights``: a weights file of a patch encoder (or ``hub``);
- ``--workers``: worker processes, one slide each (tile, synth, predict);
- ``--loader-workers``: DataLoader workers reading patches inside one process (extract, lrmil);
- ``--batch-size``: patches per encoder batch (extract, lrmil encoding, predict);
- ``--bag-batch-size``: bags per training or evaluation step (train, evaluate);
- ``--mag``: a magnification, ``20`` or ``20x`` (:func:`wsimil.slide.mag.parse_mag`);
- ``--bundle``: a bundle folder.

A renamed flag stays as a hidden option; :func:`renamed` takes both values and warns once, in one line, when the
old spelling is used.
"""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

from wsimil.errors import WsimilError

T = TypeVar("T")


def renamed(new_value: T | None, old_value: T | None, new: str, old: str, default: T | None = None) -> T | None:
    """The value of a flag renamed from ``old`` to ``new``: the new spelling's, else the old one's (with a one-line
    ``FutureWarning``), else ``default``. Both spellings with different values is an error."""
    if old_value is None:
        return default if new_value is None else new_value
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}", FutureWarning, 2)
    if new_value is not None and new_value != old_value:
        raise WsimilError(f"{new} {new_value} and the deprecated {old} {old_value} disagree; give only {new}")
    return old_value


def deprecated_value(value: Any, flag: str, why: str) -> None:
    """Warn (one line) that ``flag`` is no longer needed when it was given."""
    if value is not None:
        warnings.warn(f"{flag} is deprecated and will be removed in the next release: {why}", FutureWarning, 2)
