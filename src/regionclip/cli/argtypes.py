"""argparse ``type=`` converters that check ranges, so a bad option value fails at parse time (before any model
loads) with argparse's one-line ``error: argument --x: ...`` message and exit code 2."""
from __future__ import annotations

import argparse
import math
from typing import Callable, Optional, Union

Number = Union[int, float]


def ranged(kind: type, lo: Optional[Number] = None, hi: Optional[Number] = None, *, lo_open: bool = False,
           what: str = "") -> Callable[[str], Number]:
    """A converter to ``kind`` (int or float) accepting ``lo <= v <= hi`` (``lo < v`` with ``lo_open``)."""

    def convert(text: str) -> Number:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi)
        if bad:
            if lo is not None and hi is not None:
                want = f"in ({lo}, {hi}]" if lo_open else f"between {lo} and {hi}"
            elif lo is not None:
                want = f"> {lo}" if lo_open else f">= {lo}"
            else:
                want = f"<= {hi}"
            raise argparse.ArgumentTypeError(f"must be {want}{what}, got {text}")
        return v

    convert.__name__ = kind.__name__  # argparse names the type in some messages
    return convert


fraction = ranged(float, 0.0, 1.0)  # scores, IoU thresholds
positive_int = ranged(int, 1)
nonneg_int = ranged(int, 0)
positive_float = ranged(float, 0.0, lo_open=True)
nonneg_float = ranged(float, 0.0)
