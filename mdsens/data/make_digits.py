"""Regenerate ``digits.npz`` from the copy of the UCI digits scikit-learn ships (provenance: README.md).

    python mdsens/data/make_digits.py PATH/TO/digits.csv.gz

``digits.csv.gz`` sits inside any scikit-learn wheel at ``sklearn/datasets/data/``; get one
without installing it with ``pip download scikit-learn --no-deps -d /tmp/sklearn`` and
``unzip`` that file out of the wheel. scikit-learn is not a dependency of mdsens, and this
script does not import it. The CSV has one row per image: 64 pixel counts (row-major 8×8,
integers 0..16), then the label 0..9.

The output is written byte for byte reproducibly (fixed zip timestamps, stored order), so
``sha256sum digits.npz`` can be compared with README.md.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

#: SHA-256 of ``sklearn/datasets/data/digits.csv.gz`` (unchanged in scikit-learn 0.2x-1.9).
SOURCE_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
#: Images per class in the UCI test set that scikit-learn ships (1797 in all).
CLASS_COUNTS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)


def read_source(path: str):
    """``(images (1797, 64) uint8, labels (1797,) uint8)`` from scikit-learn's ``digits.csv.gz``."""
    with open(path, "rb") as handle:
        raw = handle.read()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SOURCE_SHA256:
        print(f"warning: {path} has SHA-256 {digest}, not the known {SOURCE_SHA256}", file=sys.stderr)
    table = np.loadtxt(io.StringIO(gzip.decompress(raw).decode()), delimiter=",")
    if table.shape != (1797, 65) or not np.array_equal(table, np.round(table)):
        raise ValueError(f"expected 1797 rows of 64 integer pixels and a label; got {table.shape}")
    images, labels = table[:, :64].astype(np.uint8), table[:, 64].astype(np.uint8)
    if images.max() > 16 or tuple(np.bincount(labels, minlength=10)) != CLASS_COUNTS:
        raise ValueError("pixel counts must lie in 0..16 and the class counts match the UCI test set")
    return images, labels


def write_npz(path: str, **arrays) -> None:
    """``np.savez_compressed`` with fixed timestamps, so that the file is reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit(__doc__)
    images, labels = read_source(argv[0])
    target = os.path.join(HERE, "digits.npz")
    write_npz(target, images=images, labels=labels)
    with open(target, "rb") as handle:
        print(f"wrote {target}: images {images.shape}, labels {labels.shape}, "
              f"sha256 {hashlib.sha256(handle.read()).hexdigest()}")


if __name__ == "__main__":
    main()
