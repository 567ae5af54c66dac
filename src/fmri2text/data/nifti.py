"""A run's image data read once, fast: ``.nii.gz`` inflated by ISA-L straight into reused memory.

Why not ``nibabel`` for ``.nii.gz``: its streamed gzip reader is ~4x slower than one ISA-L
inflate. Why not ``isal_zlib.decompress``: it returns a new ``bytes`` object per run, and
first touching ~340 MB of fresh pages (HAD at 2 mm) costs the kernel about as much time as
the inflate itself. So the gzip stream is inflated, by ISA-L's gzip reader, directly into
a buffer from a :class:`Scratch` pool that the next run reuses; the gzip CRC is checked.

Each volume can also be handed to a ``visit(t, volume, n_volumes)`` callback the moment it is
inflated, while it is still in cache: :func:`brain_columns` takes a run's brain voxels there
instead of reading the whole run back from memory.

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
MASK_BLOCK = 8192  # columns per slab of a max/min pass or a gather: (T, 8192) int16 ~ 2.5 MB


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


class _Gather:
    """A :func:`read_gz_nifti` visitor: takes each volume's brain voxels
    while the volume is still in cache, so the run is not read back from memory.

    The voxels taken are the non-zero ones of volume 0 (NaN counts as non-zero). Every volume
    also ORs its bits into a per-voxel word, so a voxel that is zero in volume 0 but not in a
    later one shows after the read (:func:`brain_columns` takes those from the whole run).
    """

    def __init__(self, scratch: Scratch) -> None:
        self.scratch = scratch
        self.x = None  # (T, n) file dtype: voxels ``index`` over time, once volume 0 is seen

    def __call__(self, t: int, vol: np.ndarray, n_t: int) -> None:
        if t == 0:
            if vol.dtype.kind not in "iuf" or vol.dtype.itemsize > 8:
                return  # not visited: brain_columns reads the whole run instead
            self.index = np.flatnonzero(vol)  # (n,) file positions
            self.x = self.scratch.array((n_t, len(self.index)), vol.dtype)
            self.bits = np.zeros(vol.shape, f"u{vol.dtype.itemsize}")
        elif self.x is None:
            return
        np.take(vol, self.index, out=self.x[t], mode="clip")  # indices are in range: no check
        np.bitwise_or(self.bits, vol.view(self.bits.dtype), out=self.bits)


def column_flags(vmax: np.ndarray, vmin: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(nonzero, nonfinite, constant) per column from its max and min over time.

    A NaN propagates into the max and an infinity shows in the max or min, so a column is
    non-finite exactly when its max or min is; constant = max == min (NaN compares unequal);
    non-zero = any non-zero or non-finite value (a volume's background is exactly zero).
    """
    if vmax.dtype.kind == "f":
        nonfinite = ~(np.isfinite(vmax) & np.isfinite(vmin))
    else:
        nonfinite = np.zeros(len(vmax), bool)
    nonzero = (vmax != 0) | (vmin != 0) | nonfinite
    return nonzero, nonfinite, (vmax == vmin) & ~nonfinite


def max_min(series: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column max and min of a (T, V) series, slab by slab while a slab is in cache."""
    n_v = series.shape[1]
    vmax, vmin = np.empty(n_v, series.dtype), np.empty(n_v, series.dtype)
    for a in range(0, n_v, MASK_BLOCK):
        slab = series[:, a:a + MASK_BLOCK]
        np.max(slab, axis=0, out=vmax[a:a + MASK_BLOCK])
        np.min(slab, axis=0, out=vmin[a:a + MASK_BLOCK])
    return vmax, vmin


def take_columns(series: np.ndarray, index: np.ndarray, scratch: Scratch) -> np.ndarray:
    """(T, len(index)) columns of a (T, V) series, on a pooled buffer, slab by slab."""
    x = scratch.array((series.shape[0], len(index)), series.dtype)
    for a in range(0, len(index), MASK_BLOCK):
        np.take(series, index[a:a + MASK_BLOCK], axis=1, out=x[:, a:a + MASK_BLOCK])
    return x


def brain_columns(bold_path: str, scratch: Scratch):
    """A run's brain voxels over time, read once.

    Returns ``(x, index, shape)``: ``x`` (T, n) in the file's dtype (on a pooled buffer: give
    it back), ``index`` (n,) the grid position of each column in file order (Fortran order
    for a volume) and ``shape`` the volume shape, or None for CIFTI. Volume brain voxels =
    non-zero (or non-finite) at some time; every CIFTI grayordinate is brain.
    """
    gather, pooled = _Gather(scratch), None
    try:
        series, shape, pooled = read_series(bold_path, scratch, gather)
        if gather.x is not None:  # streamed; add the voxels first non-zero after volume 0
            x, index = gather.x, gather.index
            late = gather.bits != 0
            late[index] = False
            late = np.flatnonzero(late)
            if len(late):
                cols = take_columns(series, late, scratch)
                keep = column_flags(*max_min(cols))[0]  # bits set, value zero: -0.0 only
                both = scratch.array((x.shape[0], x.shape[1] + int(keep.sum())), x.dtype)
                both[:, :x.shape[1]] = x
                both[:, x.shape[1]:] = cols[:, keep]
                scratch.give(x, cols)
                x, index = both, np.concatenate([index, late[keep]])
            return x, index, shape
        if shape is None:  # CIFTI: every grayordinate, the array as read (not pooled)
            return series, np.arange(series.shape[1]), None
        index = np.flatnonzero(column_flags(*max_min(series))[0])
        return take_columns(series, index, scratch), index, shape
    except BaseException:
        scratch.give(gather.x)
        raise
    finally:
        scratch.give(pooled)
