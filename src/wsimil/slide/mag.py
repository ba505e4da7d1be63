"""Magnification: one type, one parser, one spelling.

A magnification is a positive ``float`` ``m`` meaning ``10/m`` µm/px (20× = 0.5 µm/px, 5× = 2.0 µm/px). Every
step reads it with :func:`parse_mag` (accepts ``20``, ``20.0``, ``"20"``, ``"20x"``, ``"20X"``) and writes it
with :func:`mag_name` (``"20x"``, ``"2.5x"``: the spelling in grid folder names, links datasets, status columns
and messages). :func:`native_mag` is the integer objective a scan of ``mpp`` µm/px reports (Aperio ``AppMag``).
"""

from __future__ import annotations

import math

from wsimil.errors import WsimilError

Mag = float  # 20.0 = 20x = 0.5 µm/px


def parse_mag(value: float | int | str, what: str = "--mag") -> Mag:
    """``value`` as a magnification (``20``, ``"20"``, ``"20x"`` → ``20.0``); a clear error for anything else."""
    text = str(value).strip()
    try:
        m = float(text[:-1] if text[-1:] in ("x", "X") else text)
    except (ValueError, IndexError):
        raise WsimilError(f"{what} {text!r} is not a magnification: give a number such as 20 or 20x") from None
    if not math.isfinite(m) or m <= 0:
        raise WsimilError(f"{what} {text} is not a magnification: give a positive number, e.g. {what} 20 (0.5 µm/px)")
    return m


def mag_name(mag: float | int | str) -> str:
    """The one spelling of a magnification in names and messages: ``20.0`` → ``"20x"``, ``2.5`` → ``"2.5x"``
    (any spelling :func:`parse_mag` reads is accepted)."""
    return f"{parse_mag(mag):g}x"


def mag_to_mpp(mag: float) -> float:
    """µm per pixel at magnification ``mag`` (``10/mag``; the same formula turns a level-0 µm/px into its
    magnification)."""
    return 10.0 / mag


def native_mag(mpp: float) -> int:
    """The whole objective magnification of a scan at ``mpp`` µm/px (0.25 → 40, 0.5 → 20), as scanners record it."""
    return int(round(mag_to_mpp(mpp)))
