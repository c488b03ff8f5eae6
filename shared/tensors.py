"""Tensor bodies on the wire: safetensors, float32, checked strictly before anything uses them.

A safetensors body is an 8-byte little-endian header length N, N bytes of JSON header, then the
data section. The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` (offsets
relative to the data section) and may carry a ``"__metadata__"`` map of strings.

``validate_tensors`` is what the coordinator runs on every upload: size limit first, then a strict
header check of our own (``read_safetensors_header``), then names, dtypes and shapes against the
manifest, and finally finiteness of the values.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy

from shared.manifest import header_allowance

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100_000_000
HEADER_LENGTH_BYTES = 8
# Bounds checked before any arithmetic on a header's numbers, so the checks cost the same whatever
# a hostile header holds: a product of hundreds of unbounded integers grows with the square of
# their length (and holds the GIL), and Python refuses to print an integer of more than 4300 digits.
MAX_DIMS = 16
MAX_DIM = 2**48
MAX_OFFSET = 2**62

REASONS: frozenset[str] = frozenset({
    "too_large", "corrupt", "missing_key", "extra_key", "wrong_shape", "wrong_dtype", "non_finite",
    "out_of_range",
})

# Item size in bytes of each dtype the safetensors format defines.
SAFETENSORS_DTYPE_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}
_ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


class TensorValidationError(ValueError):
    """A tensor body was refused.

    Attributes:
        reason: machine-readable cause, one of ``REASONS``: "too_large", "corrupt",
            "missing_key", "extra_key", "wrong_shape", "wrong_dtype", "non_finite" or
            "out_of_range" (a finite value beyond the caller's magnitude bound).
        message: human-readable text naming the tensor and what was expected versus got.
    """

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown tensor validation reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message


def _corrupt(message: str) -> TensorValidationError:
    return TensorValidationError("corrupt", f"corrupt safetensors body: {message}")


def _short(value: object, limit: int = 200) -> str:
    """``repr`` of a header value for an error message, cut to ``limit`` characters: safe for any
    JSON value (integers beyond Python's 4300-digit printing limit included)."""
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[:limit] + "..."


def pack_tensors(
    tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None
) -> bytes:
    """Serialise named arrays to safetensors bytes, each as contiguous float32.

    Raises:
        TensorValidationError: reason "non_finite" if any value is NaN or infinite after the
            cast to float32 (float64 values beyond the float32 range included).
    """
    packed: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        with np.errstate(over="ignore", invalid="ignore"):
            # order="C", not np.ascontiguousarray: that one turns a 0-d array into shape (1,)
            array = np.asarray(np.asarray(value), dtype=np.float32, order="C")
        if not np.all(np.isfinite(array)):
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise TensorValidationError(
                "non_finite", f"tensor {name!r}: expected finite float32 values, "
                              f"got {bad} NaN or infinite of {array.size}")
        packed[name] = array
    return safetensors.numpy.save(packed, metadata=metadata)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"JSON constant {token} not allowed")


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _is_non_negative_int(value: object, bound: int = MAX_OFFSET) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= bound


def _valid_shape(shape: object) -> bool:
    """A list of at most MAX_DIMS integers in [0, MAX_DIM]: checked before its product is taken."""
    return (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(_is_non_negative_int(d, MAX_DIM) for d in shape))


def _known_dtype(dtype: object, known: Mapping[str, Any]) -> bool:
    return isinstance(dtype, str) and dtype in known  # a list or object is not hashable: no TypeError


def read_safetensors_header(data: bytes) -> dict[str, Any]:
    """Parse and strictly check the header of a safetensors body.

    Checks: at least 8 bytes; header length <= 100 MB and within the buffer; UTF-8 JSON object
    without duplicate keys; an optional ``"__metadata__"`` object of strings; every other entry
    has exactly ``dtype`` (a safetensors dtype), ``shape`` (non-negative ints) and
    ``data_offsets`` ([begin, end], begin <= end) with ``end - begin`` equal to the byte size
    implied by dtype and shape; the entries' byte ranges do not overlap, leave no gaps and cover
    the data section exactly.

    Returns:
        The header dict as parsed (``"__metadata__"`` included when present).

    Raises:
        TensorValidationError: reason "corrupt" on any violation.
    """
    data = bytes(data)
    if len(data) < HEADER_LENGTH_BYTES:
        raise _corrupt(f"{len(data)} bytes, shorter than the 8-byte header length")
    header_length = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
    if header_length > MAX_HEADER_BYTES:
        raise _corrupt(f"header length {header_length} exceeds {MAX_HEADER_BYTES}")
    if HEADER_LENGTH_BYTES + header_length > len(data):
        raise _corrupt(f"header length {header_length} points past the end of "
                       f"{len(data)} bytes")
    return _check_header(data[HEADER_LENGTH_BYTES : HEADER_LENGTH_BYTES + header_length],
                         len(data) - HEADER_LENGTH_BYTES - header_length)


def _check_header(raw: bytes, data_section_length: int) -> dict[str, Any]:
    """The JSON part of ``read_safetensors_header``: ``raw`` is the header's bytes, followed in
    the body by a data section of ``data_section_length`` bytes."""
    try:
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _corrupt(f"header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise _corrupt(f"header is a JSON {type(header).__name__}, expected an object")

    metadata = header.get(METADATA_KEY)
    if METADATA_KEY in header and not (
        isinstance(metadata, dict)
        and all(isinstance(value, str) for value in metadata.values())
    ):
        raise _corrupt("__metadata__ must be an object of strings")

    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        if not isinstance(entry, dict) or set(entry) != _ENTRY_FIELDS:
            raise _corrupt(f"tensor {name!r:.200}: expected exactly the fields "
                           f"{sorted(_ENTRY_FIELDS)}, got {_short(entry)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not _known_dtype(dtype, SAFETENSORS_DTYPE_ITEMSIZE):
            raise _corrupt(f"tensor {name!r:.200}: unknown dtype {_short(dtype)}")
        if not _valid_shape(shape):
            raise _corrupt(f"tensor {name!r:.200}: shape must be a list of at most {MAX_DIMS} integers in "
                           f"[0, {MAX_DIM}], got {_short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_is_non_negative_int(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise _corrupt(f"tensor {name!r:.200}: data_offsets must be [begin, end] with "
                           f"0 <= begin <= end <= {MAX_OFFSET}, got {_short(offsets)}")
        expected_size = math.prod(shape) * SAFETENSORS_DTYPE_ITEMSIZE[dtype]
        if offsets[1] - offsets[0] != expected_size:
            raise _corrupt(f"tensor {name!r}: {dtype} {shape} needs {expected_size} bytes, "
                           f"data_offsets span {offsets[1] - offsets[0]}")
        ranges.append((offsets[0], offsets[1], name))

    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise _corrupt(f"tensor {name!r}: data_offsets [{begin}, {end}] {what} "
                           f"(expected begin {position})")
        position = end
    if position != data_section_length:
        raise _corrupt(f"tensors cover {position} bytes of a {data_section_length}-byte "
                       f"data section")
    return header


def unpack_tensors(data: bytes) -> dict[str, np.ndarray]:
    """Deserialise a safetensors body into named numpy arrays (their stored dtypes).

    Raises:
        TensorValidationError: reason "corrupt" on anything unparsable, including a header that
            fails ``read_safetensors_header``.
    """
    data = bytes(data)
    read_safetensors_header(data)
    try:
        return dict(safetensors.numpy.load(data))
    except Exception as error:  # the library raises several types; all mean "unparsable"
        raise _corrupt(f"{type(error).__name__}: {error}") from None


_NUMPY_DTYPES: dict[str, str] = {
    "BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
    "I32": "<i4", "U32": "<u4", "F32": "<f4", "I64": "<i8", "U64": "<u8", "F64": "<f8",
}


def map_tensors(path: str | os.PathLike[str], *, strict: bool = True) -> dict[str, np.ndarray]:
    """Named read-only arrays over a safetensors file, memory-mapped instead of read and copied.

    The data stays in the page cache, so a caller that walks many files tensor by tensor
    (aggregating a round) holds one tensor's worth of its own memory at a time, not every file.

    ``strict``: the header gets the full check of ``read_safetensors_header``. Without it (for
    files that passed that check when they were accepted: it costs more than the mapping) the
    header is only parsed, and every array must still lie inside the file with a size that
    matches its shape, so a damaged file is refused rather than read out of bounds.

    Raises:
        TensorValidationError: reason "corrupt" on a header that fails the check, and for a
            dtype numpy cannot map (bfloat16, float8).
    """
    header, start, size, mapped = _open_mapped(path, strict)
    return _mapped_arrays(header, mapped, start, size)


def _open_mapped(path: str | os.PathLike[str], strict: bool,
                 expected: Mapping[str, tuple[int, ...]] | None = None) -> tuple[dict[str, Any], int, int, Any]:
    """(header, offset of the data section, file size, read-only map of the file) of a file.
    With ``expected`` (an upload), a header longer than those tensors need is refused unread."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(HEADER_LENGTH_BYTES)
        if len(prefix) < HEADER_LENGTH_BYTES:
            raise _corrupt(f"{size} bytes, shorter than the 8-byte header length")
        header_length = int.from_bytes(prefix, "little")
        if header_length > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + header_length > size:
            raise _corrupt(f"header length {header_length} does not fit a {size}-byte file")
        if expected is not None:
            _check_header_length(header_length, expected)
        raw = file.read(header_length)
        if strict:
            header = _check_header(raw, size - HEADER_LENGTH_BYTES - header_length)
        else:
            try:
                header = json.loads(raw)
            except (UnicodeDecodeError, ValueError, RecursionError) as error:
                raise _corrupt(f"header is not valid JSON: {error}") from None
            if not isinstance(header, dict):
                raise _corrupt(f"header is a JSON {type(header).__name__}, expected an object")
        start = HEADER_LENGTH_BYTES + header_length
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size > start else b""
    return header, start, size, mapped


def _mapped_arrays(header: dict[str, Any], mapped: Any, start: int, size: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        if not isinstance(entry, dict) or not _known_dtype(entry.get("dtype"), _NUMPY_DTYPES):
            raise _corrupt(f"tensor {name!r:.200}: {_short(entry, 80)} is not an entry of a dtype numpy can map")
        try:
            dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
            begin, end = (int(o) for o in entry["data_offsets"])
            shape = entry["shape"]
            if not _valid_shape(shape):
                raise ValueError(f"shape must be a list of at most {MAX_DIMS} integers in [0, {MAX_DIM}], "
                                 f"got {_short(shape, 80)}")
            if not 0 <= begin <= end <= size - start or end - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"data_offsets [{begin}, {end}] do not hold {entry['dtype']} {shape} "
                                 f"inside the {size - start}-byte data section")
            flat = (np.frombuffer(mapped, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=start + begin)
                    if end > begin else np.empty(0, dtype))
            arrays[name] = flat.reshape(shape)
        except (KeyError, TypeError, ValueError) as error:
            raise _corrupt(f"tensor {name!r}: {error}") from None
    return arrays


def _check_header_length(header_length: int, expected: Mapping[str, tuple[int, ...]]) -> None:
    limit = header_allowance(len(expected))
    if header_length > limit:
        raise _corrupt(f"header of {header_length} bytes exceeds the {limit} bytes a body of "
                       f"{len(expected)} tensors needs")


def magnitude(array: np.ndarray) -> float:
    """The largest |value| of an array (0 when empty, inf when any value is NaN or infinite), from
    its minimum and maximum: no temporary array, so a memory-mapped upload is read once."""
    if not array.size:
        return 0.0
    low, high = float(array.min()), float(array.max())  # a NaN makes both NaN
    return max(-low, high) if math.isfinite(low) and math.isfinite(high) else math.inf


def _check_magnitude(arrays: Mapping[str, np.ndarray], max_abs: float | None) -> None:
    """Finite values first ("non_finite"), then, with a bound, no |value| above it ("out_of_range")."""
    for name in sorted(arrays):
        array = arrays[name]
        largest = magnitude(array)
        if largest == math.inf:
            bad = int(np.count_nonzero(~np.isfinite(array)))
            raise TensorValidationError(
                "non_finite",
                f"tensor {name!r}: expected finite values, got {bad} NaN or infinite "
                f"of {array.size}")
        if max_abs is not None and largest > max_abs:
            raise TensorValidationError(
                "out_of_range",
                f"tensor {name!r}: values must lie within +-{max_abs:g}, got {largest:.4g} "
                f"(the tier's max_abs_value)")


def validate_tensors(
    data: bytes, expected: Mapping[str, tuple[int, ...]], max_bytes: int, max_abs: float | None = None
) -> dict[str, np.ndarray]:
    """Check an uploaded body against the expected names and shapes and return its arrays.

    Order of checks: size (``len(data) > max_bytes`` -> "too_large", before any parsing), header
    length (more than ``shared.manifest.header_allowance`` of the expected tensors -> "corrupt",
    before parsing it), header (``read_safetensors_header`` -> "corrupt"), names ("missing_key",
    then "extra_key"; ``"__metadata__"`` is not a tensor), per tensor in sorted name order dtype !=
    F32 ("wrong_dtype") and shape ("wrong_shape"), then values ("non_finite"; with ``max_abs``,
    a magnitude above it: "out_of_range").

    Returns:
        name -> float32 array of the expected shape (fresh, writable copies).

    Raises:
        TensorValidationError: with the reason above and a message naming the tensor.
    """
    if len(data) > max_bytes:
        raise TensorValidationError(
            "too_large", f"body of {len(data)} bytes exceeds the limit of {max_bytes} bytes")
    data = bytes(data)
    if len(data) >= HEADER_LENGTH_BYTES:
        _check_header_length(int.from_bytes(data[:HEADER_LENGTH_BYTES], "little"), expected)
    header = read_safetensors_header(data)
    expected_shapes = _check_entries(header, expected)

    data_start = HEADER_LENGTH_BYTES + int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(expected_shapes):
        entry = header[name]
        shape = expected_shapes[name]
        begin = data_start + entry["data_offsets"][0]
        array = np.frombuffer(data, dtype="<f4", count=math.prod(shape), offset=begin)
        arrays[name] = array.astype(np.float32).reshape(shape)
    _check_magnitude(arrays, max_abs)
    return arrays


def _check_entries(header: dict[str, Any], expected: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Names ("missing_key", then "extra_key"), then per tensor in sorted name order dtype != F32
    ("wrong_dtype") and shape ("wrong_shape"). Returns the expected shapes as int tuples."""
    expected_shapes = {name: tuple(int(d) for d in shape) for name, shape in expected.items()}
    present = set(header) - {METADATA_KEY}
    missing = sorted(set(expected_shapes) - present)
    if missing:
        raise TensorValidationError(
            "missing_key", f"missing tensors {missing}; expected {sorted(expected_shapes)}")
    extra = sorted(present - set(expected_shapes))
    if extra:
        raise TensorValidationError(
            "extra_key", f"unexpected tensors {extra}; expected {sorted(expected_shapes)}")
    for name in sorted(expected_shapes):
        entry = header[name]
        if entry["dtype"] != "F32":
            raise TensorValidationError(
                "wrong_dtype", f"tensor {name!r}: expected dtype F32, got {entry['dtype']}")
        shape = tuple(entry["shape"])
        if shape != expected_shapes[name]:
            raise TensorValidationError(
                "wrong_shape",
                f"tensor {name!r}: expected shape {expected_shapes[name]}, got {shape}")
    return expected_shapes


def validate_tensor_file(path: str | os.PathLike[str], expected: Mapping[str, tuple[int, ...]],
                         max_bytes: int, max_abs: float | None = None) -> None:
    """``validate_tensors`` for a body already on disk (an upload streamed to a temp file): the
    same checks in the same order with the same reasons, but the file is memory-mapped, not read
    into memory and copied, and finiteness is checked without temporary arrays (a NaN makes the
    minimum NaN, an infinity is the minimum or the maximum).

    Raises:
        TensorValidationError: as ``validate_tensors``.
    """
    size = os.stat(path).st_size
    if size > max_bytes:
        raise TensorValidationError(
            "too_large", f"body of {size} bytes exceeds the limit of {max_bytes} bytes")
    header, start, size, mapped = _open_mapped(path, strict=True, expected=expected)
    _check_entries(header, expected)
    _check_magnitude(_mapped_arrays(header, mapped, start, size), max_abs)
