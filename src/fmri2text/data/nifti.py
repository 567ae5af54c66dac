"""A run's image data read once, fast: ``.nii.gz`` inflated by ISA-L straight into reused memory.

Why not ``nibabel`` for ``.nii.gz``: its streamed gzip reader is ~4x slower than one ISA-L
inflate. Why not ``isal_zlib.decompress``: it returns a new ``bytes`` object per run, and
first touching ~340 MB of fresh pages (HAD at 2 mm) costs the kernel about as much time as
the inflate itself. So the gzip stream is inflated, by ISA-L's gzip reader, directly into
a buffer from a :class:`Scratch` pool that the next run reuses; the gzip CRC is checked.

Each volume can also be handed to a ``visit(t, volume, n_volumes)`` callback the moment it is
inflated, while it is still in cache: :func:`fmri2text.data.fmri._process_run` gathers the
brain voxels there instead of reading the whole run back from memory.

Uncompressed ``.nii`` and CIFTI files go through nibabel.
"""

from __future__ import annotations

import gzip
import io
import threading
import zlib

import nibabel as nib
import numpy as np
from isal import isal_zlib
from isal.isal_zlib import _GzipReader  # ISA-L's gzip reader (what isal.igzip.open uses), with readinto

from fmri2text.errors import UserError

READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, isal_zlib.error)
HEADER_BYTES = 540  # a NIfTI-2 header; a NIfTI-1 header (348) and the first data bytes
READ_CHUNK = 1 << 20  # compressed bytes read from the file at a time


class Scratch:
    """A pool of large work buffers, reused across runs (thread-safe).

    ``array`` hands out an array on the smallest free buffer that fits and is at most twice
    the size asked for (or a new one); ``give`` returns the buffers of arrays that are no
    longer used. A small request never takes a much larger buffer: that buffer's next user
    (the next run's ~340 MB read) would then fault in fresh pages, which costs the kernel
    about as much as the inflate. The pool lives as long as its owner (one
    :func:`fmri2text.data.fmri.extract_responses` call, or a whole ``prepare``).
    """

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []  # (nbytes,) uint8 buffers not in use
        self._lent: dict[int, np.ndarray] = {}  # id -> buffer handed out by array()
        self._lock = threading.Lock()

    def array(self, shape: tuple, dtype, order: str = "C") -> np.ndarray:
        """An uninitialised array of ``shape`` and ``dtype`` on a pooled buffer."""
        dtype = np.dtype(dtype)
        nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= b.nbytes <= 2 * nbytes]
            base = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes)) if fits else None
        if base is None:
            base = np.empty(nbytes, np.uint8)
        with self._lock:
            self._lent[id(base)] = base
        return np.ndarray(shape, dtype, buffer=base, order=order)

    def give(self, *arrays: np.ndarray | None) -> None:
        """Return the buffers under ``arrays`` (from :meth:`array`) to the pool."""
        with self._lock:
            for a in arrays:
                base = None if a is None else self._lent.pop(id(a.base), None)
                if base is not None:  # one of ours, not yet returned
                    self._free.append(base)


def _nifti_header(head: bytes):
    """The NIfTI-1 or NIfTI-2 header at the start of ``head``."""
    for cls in (nib.Nifti1Header, nib.Nifti2Header):
        size = cls.template_dtype.itemsize
        if len(head) < size:
            continue
        try:
            return cls.from_fileobj(io.BytesIO(head[:size]))
        except (nib.spatialimages.HeaderDataError, ValueError):
            continue
    raise ValueError("not a NIfTI-1/2 header")


def read_gz_nifti(path: str, scratch: Scratch, visit=None) -> tuple[np.ndarray, bool]:
    """Data of a ``.nii.gz``: the (X, Y, Z, ...) array, Fortran order, and whether it is pooled.

    The array lies on a ``scratch`` buffer (give it back when done) unless the header's
    scl_slope/scl_inter scale it, which makes a new float32 array.

    ``visit(t, volume, n_volumes)``, when given, is called for each volume ``t`` of an
    unscaled 4-D image as soon as it is inflated: ``volume`` is a (X*Y*Z,) view of the
    buffer in file order and the file's dtype. Scaled or non-4-D images are not visited.
    """
    with open(path, "rb") as fh:
        reader = _GzipReader(fh, READ_CHUNK)
        head = reader.read(HEADER_BYTES)
        header = _nifti_header(head)
        shape, dtype = header.get_data_shape(), header.get_data_dtype()
        offset = int(header["vox_offset"])
        slope, inter = header.get_slope_inter()
        scaled = slope not in (None, 1.0) or inter not in (None, 0.0)
        arr = scratch.array(shape, dtype, order="F")
        flat = arr.reshape(-1, order="A").view(np.uint8)  # the buffer, in file order (a view)
        step = flat.size  # bytes inflated per call: a volume when visiting, else all
        if visit is not None and len(shape) == 4 and not scaled and flat.size:
            step = int(np.prod(shape[:3])) * dtype.itemsize
        else:
            visit = None
        try:
            got = min(max(len(head) - offset, 0), flat.size)  # data bytes already in ``head``
            if got:
                flat[:got] = np.frombuffer(head, np.uint8, got, offset)
            if offset > len(head) and len(reader.read(offset - len(head))) != offset - len(head):
                raise EOFError("the file ends inside its header extensions")
            view, visited = memoryview(flat), 0
            while got < flat.size:
                n = reader.readinto(view[got:min(flat.size, (got // step + 1) * step)])
                if n == 0:
                    raise EOFError(f"the image data ends after {got} of {flat.size} bytes")
                got += n
                while visit is not None and (visited + 1) * step <= got:
                    visit(visited, flat[visited * step:(visited + 1) * step].view(dtype), shape[3])
                    visited += 1
            while reader.read(READ_CHUNK):  # anything after the data, to the gzip CRC check
                pass
        except BaseException:
            scratch.give(arr)
            raise
    if scaled:
        values = arr * np.float32(1.0 if slope is None else slope) + np.float32(inter or 0.0)
        scratch.give(arr)
        return values, False
    return arr, True


def read_series(path: str, scratch: Scratch, visit=None) -> tuple[np.ndarray, tuple | None, np.ndarray | None]:
    """The whole run read once: ((T, V) series, volume shape or None for CIFTI, pooled array).

    ``series`` is (T, V) with V the grid in the file's own order: Fortran order for a NIfTI
    volume, whose (V, T) layout transposes to (T, V) without a copy. The third item is the
    array to :meth:`Scratch.give` back once ``series`` is no longer used (None if not pooled).
    ``visit`` is passed to :func:`read_gz_nifti` (other formats are not visited).
    """
    pooled = None
    try:
        if str(path).endswith(".nii.gz"):
            arr, is_pooled = read_gz_nifti(path, scratch, visit)
            pooled = arr if is_pooled else None
            if arr.ndim != 4:
                raise ValueError(f"expected a 4-D image, got shape {arr.shape}")
        else:
            img = nib.load(path)
            arr = np.asanyarray(img.dataobj)
            if isinstance(img, nib.Cifti2Image):
                return arr, None, None  # (T, G)
    except READ_ERRORS as err:
        scratch.give(pooled)
        raise UserError(f"cannot read the image data (truncated or corrupt file?): {err}",
                        path=path, fix="re-download or re-create this file") from None
    return arr.reshape(-1, arr.shape[3], order="F").T, arr.shape[:3], pooled
