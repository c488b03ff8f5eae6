"""Wire tensors: round trips, and every refusal reason on a crafted bad body."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.tensors import (
    TensorValidationError,
    map_tensors,
    pack_tensors,
    read_safetensors_header,
    unpack_tensors,
    validate_tensor_file,
    validate_tensors,
)

pytestmark = pytest.mark.unit

EXPECTED = {"blocks.0.q.lora_A": (2, 3), "blocks.0.q.lora_B": (4, 2), "head.bias": (5,)}
LIMIT = 1 << 20


def valid_tensors():
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in EXPECTED.items()}


def craft_body(header: dict, payload: bytes) -> bytes:
    """A safetensors body written by hand: 8-byte little-endian length, JSON header, data."""
    header_bytes = json.dumps(header).encode()
    return struct.pack("<Q", len(header_bytes)) + header_bytes + payload


def refusal(data, expected=EXPECTED, max_bytes=LIMIT) -> TensorValidationError:
    with pytest.raises(TensorValidationError) as caught:
        validate_tensors(data, expected, max_bytes)
    return caught.value


# --- round trips ------------------------------------------------------------------------------

def test_pack_validate_round_trip_preserves_values_and_metadata():
    tensors = valid_tensors()

    body = pack_tensors(tensors, metadata={"tier": "root", "round": "3"})
    validated = validate_tensors(body, EXPECTED, LIMIT)
    unpacked = unpack_tensors(body)

    assert sorted(validated) == sorted(EXPECTED)
    for name, array in tensors.items():
        assert validated[name].dtype == np.float32
        np.testing.assert_array_equal(validated[name], array)
        np.testing.assert_array_equal(unpacked[name], array)
    assert read_safetensors_header(body)["__metadata__"] == {"tier": "root", "round": "3"}
    validated["head.bias"][0] = 42.0  # returned arrays are writable copies


def test_pack_casts_to_contiguous_float32():
    source = np.arange(12, dtype=np.float64).reshape(3, 4).T  # non-contiguous float64

    unpacked = unpack_tensors(pack_tensors({"x": source}))

    assert unpacked["x"].dtype == np.float32
    np.testing.assert_array_equal(unpacked["x"], source.astype(np.float32))
    assert read_safetensors_header(pack_tensors({"x": source}))["x"]["shape"] == [4, 3]


def test_round_trip_of_empty_and_zero_size_tensors():
    body = pack_tensors({"empty": np.zeros((0, 3)), "scalar_like": np.ones((1,))})

    validated = validate_tensors(body, {"empty": (0, 3), "scalar_like": (1,)}, LIMIT)

    assert validated["empty"].shape == (0, 3)
    assert validated["scalar_like"].tolist() == [1.0]
    assert validate_tensors(pack_tensors({}), {}, LIMIT) == {}


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf, 1e300])
def test_pack_refuses_non_finite_values(bad_value):
    with pytest.raises(TensorValidationError) as caught:
        pack_tensors({"w": np.array([1.0, bad_value])})

    assert caught.value.reason == "non_finite"
    assert "'w'" in str(caught.value)


def test_error_reason_must_be_known():
    with pytest.raises(ValueError, match="unknown"):
        TensorValidationError("bad_mood", "no")
    error = TensorValidationError("corrupt", "details")
    assert isinstance(error, ValueError) and error.reason == "corrupt" and str(error) == "details"


# --- each refusal reason ----------------------------------------------------------------------

def test_wrong_shape_is_refused_with_expected_and_got():
    tensors = valid_tensors()
    tensors["blocks.0.q.lora_B"] = np.zeros((2, 4), dtype=np.float32)

    error = refusal(pack_tensors(tensors))

    assert error.reason == "wrong_shape"
    assert "blocks.0.q.lora_B" in str(error) and "(4, 2)" in str(error) and "(2, 4)" in str(error)


def test_missing_key_is_refused():
    tensors = valid_tensors()
    del tensors["head.bias"]

    error = refusal(pack_tensors(tensors))

    assert error.reason == "missing_key" and "head.bias" in str(error)


def test_extra_key_is_refused():
    tensors = valid_tensors()
    tensors["blocks.0.k.lora_A"] = np.zeros((2, 3), dtype=np.float32)

    error = refusal(pack_tensors(tensors, metadata={"note": "metadata is not a tensor"}))

    assert error.reason == "extra_key" and "blocks.0.k.lora_A" in str(error)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused(bad_value):
    tensors = valid_tensors()
    tensors["blocks.0.q.lora_A"][1, 2] = bad_value
    body = safetensors.numpy.save(tensors)  # pack_tensors would refuse to write it

    error = refusal(body)

    assert error.reason == "non_finite" and "blocks.0.q.lora_A" in str(error)


@pytest.mark.parametrize("dtype,name", [(np.float64, "F64"), (np.int32, "I32"),
                                        (np.float16, "F16")])
def test_wrong_dtype_is_refused(dtype, name):
    tensors = valid_tensors()
    tensors["head.bias"] = np.ones(5, dtype=dtype)
    body = safetensors.numpy.save(tensors)

    error = refusal(body)

    assert error.reason == "wrong_dtype"
    assert "head.bias" in str(error) and "F32" in str(error) and name in str(error)


def test_body_over_max_bytes_is_refused_before_parsing():
    body = pack_tensors(valid_tensors())

    assert refusal(body, max_bytes=len(body) - 1).reason == "too_large"
    assert refusal(b"\xff" * 100, max_bytes=99).reason == "too_large"
    assert sorted(validate_tensors(body, EXPECTED, max_bytes=len(body))) == sorted(EXPECTED)


def _two_tensor_header(a_offsets, b_offsets, a_shape=(4,), b_shape=(4,)):
    return {"a": {"dtype": "F32", "shape": list(a_shape), "data_offsets": list(a_offsets)},
            "b": {"dtype": "F32", "shape": list(b_shape), "data_offsets": list(b_offsets)}}


GOOD_TWO = craft_body(_two_tensor_header([0, 16], [16, 32]), bytes(32))
HEADER_LENGTH_OF_GOOD_TWO = struct.unpack("<Q", GOOD_TWO[:8])[0]

CORRUPT_BODIES = {
    "truncated body": GOOD_TWO[:-1],
    "extra trailing bytes": GOOD_TWO + b"\x00" * 4,
    "shorter than the length field": b"\x01\x02\x03",
    "empty": b"",
    "garbage header": struct.pack("<Q", 9) + b"not json!" + bytes(8),
    "header not utf-8": struct.pack("<Q", 2) + b"\xff\xfe",
    "header is a list": craft_body([1, 2], b""),  # type: ignore[arg-type]
    "header length past the end": struct.pack("<Q", len(GOOD_TWO)) + GOOD_TWO[8:],
    "header length over 100 MB": struct.pack("<Q", 100_000_001) + b"{}",
    "overlapping offsets": craft_body(_two_tensor_header([0, 16], [8, 24]), bytes(24)),
    "gap between tensors": craft_body(_two_tensor_header([0, 16], [20, 36]), bytes(36)),
    "not starting at zero": craft_body(_two_tensor_header([4, 20], [20, 36]), bytes(36)),
    "size inconsistent with shape": craft_body(_two_tensor_header([0, 16], [16, 28]),
                                               bytes(28)),
    "end before begin": craft_body(_two_tensor_header([16, 0], [16, 32]), bytes(32)),
    "negative dimension": craft_body(_two_tensor_header([0, 16], [16, 32], b_shape=(-4,)),
                                     bytes(32)),
    "float dimension": craft_body(_two_tensor_header([0, 16], [16, 32], b_shape=(4.0,)),
                                  bytes(32)),
    "unknown dtype": craft_body({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}},
                                bytes(4)),
    "missing data_offsets": craft_body({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)),
    "extra entry field": craft_body({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4],
                                           "sha": "x"}}, bytes(4)),
    "entry not an object": craft_body({"a": [0, 4]}, bytes(4)),
    "metadata not strings": craft_body({"__metadata__": {"round": 3}}, b""),
    "duplicate tensor name": (lambda h: struct.pack("<Q", len(h)) + h + bytes(8))(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'),
    "NaN constant in header": (lambda h: struct.pack("<Q", len(h)) + h + bytes(4))(
        b'{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}'),
    "dtype a list": craft_body({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "dtype an object": craft_body({"a": {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
    "seventeen dimensions": craft_body({"a": {"dtype": "F32", "shape": [1] * 17, "data_offsets": [0, 4]}}, bytes(4)),
    "a dimension over 2**48": craft_body({"a": {"dtype": "F32", "shape": [2**48 + 1, 0], "data_offsets": [0, 0]}},
                                         b""),
    # 250 dims of 4000 digits: the old validator multiplied them (seconds with the GIL held), then
    # failed to print the product (a 500); now refused on the first dimension's size
    "hundreds of huge dimensions": (lambda h: struct.pack("<Q", len(h)) + h)(
        b'{"a":{"dtype":"F32","data_offsets":[0,0],"shape":[' + b",".join([b"9" * 4000] * 250) + b"]}}"),
    "offset over 2**62": craft_body({"a": {"dtype": "F32", "shape": [1], "data_offsets": [2**62 + 1, 2**62 + 5]}},
                                    b""),
}


@pytest.mark.parametrize("body", CORRUPT_BODIES.values(), ids=CORRUPT_BODIES.keys())
def test_corrupt_bodies_are_refused(body):
    with pytest.raises(TensorValidationError) as from_header:
        read_safetensors_header(body)
    with pytest.raises(TensorValidationError) as from_unpack:
        unpack_tensors(body)

    assert from_header.value.reason == "corrupt"
    assert from_unpack.value.reason == "corrupt"
    assert refusal(body, expected={"a": (4,), "b": (4,)}).reason == "corrupt"


@pytest.mark.parametrize("body", CORRUPT_BODIES.values(), ids=CORRUPT_BODIES.keys())
def test_corrupt_files_are_refused_when_mapped(body, tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(body)

    with pytest.raises(TensorValidationError) as mapped:
        map_tensors(path)

    assert mapped.value.reason == "corrupt"


def test_mapped_file_equals_unpacked_body_and_is_read_only(tmp_path):
    tensors = {**valid_tensors(), "empty": np.zeros((0, 3), np.float32), "scalar": np.float32(2.5)}
    body = pack_tensors(tensors, metadata={"round": "3"})
    path = tmp_path / "blob"
    path.write_bytes(body)

    mapped = map_tensors(path)
    unpacked = unpack_tensors(body)

    assert sorted(mapped) == sorted(tensors)
    for name, value in unpacked.items():
        assert mapped[name].dtype == value.dtype == np.float32
        assert mapped[name].shape == value.shape
        np.testing.assert_array_equal(mapped[name], value)
    with pytest.raises(ValueError, match="read-only"):
        mapped["head.bias"][0] = 1.0
    assert path.read_bytes() == body


def test_mapped_file_keeps_other_dtypes_and_refuses_unmappable_ones(tmp_path):
    path = tmp_path / "blob"
    safetensors.numpy.save_file({"i": np.arange(6, dtype=np.int64).reshape(2, 3),
                                 "h": np.ones(4, np.float16)}, str(path))
    mapped = map_tensors(path)
    np.testing.assert_array_equal(mapped["i"], np.arange(6).reshape(2, 3))
    assert mapped["i"].dtype == np.int64 and mapped["h"].dtype == np.float16

    path.write_bytes(craft_body({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, bytes(4)))
    for strict in (True, False):
        with pytest.raises(TensorValidationError, match="numpy can map"):
            map_tensors(path, strict=strict)


LIGHT_CHECK_REFUSES = ["truncated body", "shorter than the length field", "empty", "garbage header",
                       "header not utf-8", "header is a list", "header length past the end",
                       "header length over 100 MB", "size inconsistent with shape", "end before begin",
                       "negative dimension", "float dimension", "unknown dtype", "missing data_offsets",
                       "entry not an object", "dtype a list", "dtype an object", "seventeen dimensions",
                       "a dimension over 2**48", "hundreds of huge dimensions"]


@pytest.mark.parametrize("kind", LIGHT_CHECK_REFUSES)
def test_unchecked_mapping_still_never_reads_outside_the_file(kind, tmp_path):
    """strict=False skips the full header check (gaps, overlaps, duplicates), but a header that
    would read out of bounds or with the wrong size is still refused."""
    path = tmp_path / "blob"
    path.write_bytes(CORRUPT_BODIES[kind])

    with pytest.raises(TensorValidationError) as mapped:
        map_tensors(path, strict=False)

    assert mapped.value.reason == "corrupt"


def test_unchecked_mapping_of_a_valid_file_equals_the_strict_one(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(pack_tensors(valid_tensors()))

    light, strict = map_tensors(path, strict=False), map_tensors(path)

    assert sorted(light) == sorted(strict)
    for name in strict:
        np.testing.assert_array_equal(light[name], strict[name])


def test_hand_crafted_good_body_is_accepted():
    header = read_safetensors_header(GOOD_TWO)
    arrays = validate_tensors(GOOD_TWO, {"a": (4,), "b": (4,)}, LIMIT)

    assert header["b"]["data_offsets"] == [16, 32]
    assert arrays["a"].tolist() == [0.0] * 4 and arrays["b"].dtype == np.float32


def test_offsets_are_read_from_the_header_not_the_name_order():
    values = np.arange(8, dtype="<f4").tobytes()
    # "b" is stored first in the data section although it sorts after "a".
    body = craft_body(_two_tensor_header([16, 32], [0, 16]), values)

    arrays = validate_tensors(body, {"a": (4,), "b": (4,)}, LIMIT)

    assert arrays["b"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert arrays["a"].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_corrupt_is_reported_before_name_checks_and_names_before_dtype():
    body_with_wrong_dtype_and_extra = safetensors.numpy.save(
        {"a": np.zeros(4, dtype=np.float64), "zz": np.zeros(1, dtype=np.float32)})

    assert refusal(body_with_wrong_dtype_and_extra, {"a": (4,)}).reason == "extra_key"
    assert refusal(body_with_wrong_dtype_and_extra[:-2], {"a": (4,)}).reason == "corrupt"


# --- properties -------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_property_random_bytes_only_ever_raise_tensor_validation_error(data):
    try:
        result = validate_tensors(data, {"a": (4,), "b": (4,)}, max_bytes=150)
    except TensorValidationError as error:
        assert error.reason in {"too_large", "corrupt", "missing_key", "extra_key",
                                "wrong_shape", "wrong_dtype", "non_finite"}
    else:
        assert sorted(result) == ["a", "b"]


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, len(GOOD_TWO) - 1), byte=st.integers(0, 255),
       cut=st.integers(0, len(GOOD_TWO)))
def test_property_mutated_valid_body_only_ever_raises_tensor_validation_error(position, byte,
                                                                             cut):
    mutated = bytearray(GOOD_TWO)
    mutated[position] = byte
    mutated = bytes(mutated[:cut])
    try:
        result = validate_tensors(mutated, {"a": (4,), "b": (4,)}, max_bytes=LIMIT)
    except TensorValidationError as error:
        assert error.reason in {"corrupt", "missing_key", "extra_key", "wrong_shape",
                                "wrong_dtype", "non_finite"}
    else:
        assert result["a"].shape == (4,) and np.all(np.isfinite(result["b"]))


def _bad_bodies() -> dict[str, tuple[bytes, dict]]:
    good = valid_tensors()
    nan, inf = dict(good), dict(good)
    nan["head.bias"] = nan["head.bias"].copy()
    nan["head.bias"][2] = np.nan
    inf["blocks.0.q.lora_A"] = inf["blocks.0.q.lora_A"].copy()
    inf["blocks.0.q.lora_A"][1, 1] = -np.inf
    missing = {k: v for k, v in good.items() if k != "head.bias"}
    extra = {**good, "x": np.zeros(2, np.float32)}
    shape = {**good, "head.bias": np.zeros(6, np.float32)}
    huge = {k: np.full_like(v, 3e38) for k, v in good.items()}
    return {
        "good": (pack_tensors(good), EXPECTED),
        "huge but finite": (pack_tensors(huge), EXPECTED),
        "nan": (safetensors.numpy.save(nan), EXPECTED),
        "inf": (safetensors.numpy.save(inf), EXPECTED),
        "missing": (pack_tensors(missing), EXPECTED),
        "extra": (pack_tensors(extra), EXPECTED),
        "shape": (pack_tensors(shape), EXPECTED),
        "float64": (safetensors.numpy.save({k: v.astype(np.float64) for k, v in good.items()}), EXPECTED),
        "bfloat16-like": (craft_body({n: {"dtype": "BF16", "shape": list(s), "data_offsets": [0, 0]}
                                      for n, s in EXPECTED.items()}, b""), EXPECTED),
        "too large": (pack_tensors(good), EXPECTED),
        **{f"corrupt: {k}": (v, {"a": (4,), "b": (4,)}) for k, v in CORRUPT_BODIES.items()},
    }


@pytest.mark.parametrize("kind", list(_bad_bodies()))
def test_file_validation_gives_the_same_verdict_as_the_bytes_validation(kind, tmp_path):
    body, expected = _bad_bodies()[kind]
    limit = 64 if kind == "too large" else LIMIT
    path = tmp_path / "upload"
    path.write_bytes(body)

    try:
        validate_tensors(body, expected, limit)
        from_bytes = None
    except TensorValidationError as exc:
        from_bytes = (exc.reason, exc.message)
    try:
        validate_tensor_file(path, expected, limit)
        from_file = None
    except TensorValidationError as exc:
        from_file = (exc.reason, exc.message)

    if kind in ("good", "huge but finite"):
        assert from_bytes is None and from_file is None
    else:
        assert from_bytes is not None and from_file is not None
        assert from_file[0] == from_bytes[0]
        if from_file[0] != "corrupt":  # the header-length wording differs between the two readers
            assert from_file[1] == from_bytes[1]


# --- bounds (issue 15): magnitudes, header length, messages -------------------------------------


def test_a_magnitude_bound_refuses_finite_but_huge_values(tmp_path):
    tensors = valid_tensors()
    tensors["head.bias"][2] = -2e4
    body = pack_tensors(tensors)
    path = tmp_path / "upload"
    path.write_bytes(body)

    assert sorted(validate_tensors(body, EXPECTED, LIMIT)) == sorted(EXPECTED)  # no bound: accepted
    for check in (lambda: validate_tensors(body, EXPECTED, LIMIT, max_abs=1e4),
                  lambda: validate_tensor_file(path, EXPECTED, LIMIT, max_abs=1e4)):
        with pytest.raises(TensorValidationError) as caught:
            check()
        assert caught.value.reason == "out_of_range"
        assert "'head.bias'" in caught.value.message and "2e+04" in caught.value.message
    assert sorted(validate_tensors(body, EXPECTED, LIMIT, max_abs=2e4)) == sorted(EXPECTED)  # at the bound: kept
    validate_tensor_file(path, EXPECTED, LIMIT, max_abs=2e4)


def test_non_finite_is_reported_before_out_of_range():
    tensors = valid_tensors()
    tensors["head.bias"][0] = 1e30
    tensors["blocks.0.q.lora_A"][0, 0] = np.nan
    assert refusal(safetensors.numpy.save(tensors)).reason == "non_finite"


def test_an_upload_header_longer_than_its_tensors_need_is_refused_unread(tmp_path):
    from shared.manifest import header_allowance

    padded = pack_tensors(valid_tensors(), metadata={"pad": "x" * header_allowance(len(EXPECTED))})
    path = tmp_path / "upload"
    path.write_bytes(padded)

    assert refusal(padded).reason == "corrupt"
    assert "exceeds the" in refusal(padded).message
    with pytest.raises(TensorValidationError) as caught:
        validate_tensor_file(path, EXPECTED, LIMIT)
    assert caught.value.reason == "corrupt"
    assert read_safetensors_header(padded)["__metadata__"]["pad"]  # as a stored file it is fine
    short = pack_tensors(valid_tensors(), metadata={"pad": "x" * 1000})
    assert sorted(validate_tensors(short, EXPECTED, LIMIT)) == sorted(EXPECTED)


@pytest.mark.parametrize("kind", ["hundreds of huge dimensions", "a dimension over 2**48", "dtype an object"])
def test_messages_of_hostile_headers_are_short(kind):
    with pytest.raises(TensorValidationError) as caught:
        read_safetensors_header(CORRUPT_BODIES[kind])
    assert len(caught.value.message) < 600
