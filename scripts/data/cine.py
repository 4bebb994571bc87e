"""The cine record every reader returns, its error type and the label values: shared by the NIfTI and DICOM readers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_FRAMES = 10
MAX_LABEL = 5  # labels 0 background, 1 LV, 2 Myo, 3 RV, 4 LA, 5 RA
LV_LABEL = 1
EXPECTED = "a 2D cine X x Y x 1 x T"


class CineError(ValueError):
    """A cine or label cine that cannot be used; the message names the file (and subject) and the problem, `path` the
    file (`load_cine` sets it where the raiser did not)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = str(path) if path else None


@dataclass(frozen=True)
class Cine:
    """One 2D+time cine: `array` (X, Y, T) (float32; uint8 for label cines from `load_subject`); `note`: what the
    reader chose or found odd but usable (e.g. which of several DICOM series it read), "" if nothing; `orientation`:
    how the loaders turned the stored array into the canonical orientation (orientation.describe), "" before."""

    array: np.ndarray
    spacing_mm: tuple[float, float]
    frame_interval_s: float
    affine: np.ndarray
    note: str = ""
    orientation: str = ""


def one_line(error: BaseException) -> str:
    """`<type>: <message>` of an exception on one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


@contextmanager
def reading(where: str, what: str) -> Iterator[None]:
    """Turn any error in the block (a CineError or MemoryError aside) into a CineError `<where>: <what> (<error>)`."""
    try:
        yield
    except (CineError, MemoryError):
        raise
    except Exception as e:  # a corrupt file can raise anything inside nibabel or pydicom
        raise CineError(f"{where}: {what} ({one_line(e)})") from e
