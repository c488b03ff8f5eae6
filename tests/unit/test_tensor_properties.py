"""Property tests (hypothesis) of the upload validator, shared.tensors.validate_tensors: whatever
the bytes, it returns exactly the expected float32 arrays or raises TensorValidationError with one
of its documented reasons; never anything else, and never a wrong reason for a known defect."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from shared.tensors import (
    REASONS,
    SAFETENSORS_DTYPE_ITEMSIZE,
    TensorValidationError,
    pack_tensors,
    read_safetensors_header,
    validate_tensors,
)

pytestmark = pytest.mark.unit

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
LIMIT = 1 << 20

names = st.from_regex(r"[a-z][a-z0-9_.]{0,20}", fullmatch=True).filter(lambda n: n != "__metadata__")
shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
expectations = st.dictionaries(names, shapes, min_size=1, max_size=5)


@st.composite
def valid_upload(draw):
    expected = draw(expectations)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    tensors = {n: rng.normal(size=s).astype(np.float32) for n, s in expected.items()}
    return expected, tensors


def _check_outcome(data: bytes, expected, limit=LIMIT):
    try:
        arrays = validate_tensors(data, expected, limit)
    except TensorValidationError as exc:
        assert exc.reason in REASONS
        return exc.reason
    assert set(arrays) == set(expected)
    for name, array in arrays.items():
        assert array.dtype == np.float32 and array.shape == tuple(expected[name])
        assert np.all(np.isfinite(array))
    return None


@SETTINGS
@given(valid_upload())
def test_a_valid_upload_round_trips(case):
    expected, tensors = case
    arrays = validate_tensors(pack_tensors(tensors), expected, LIMIT)
    assert set(arrays) == set(tensors)
    for name in tensors:
        np.testing.assert_array_equal(arrays[name], tensors[name])
        assert arrays[name].flags.writeable


@SETTINGS
@given(st.binary(max_size=2048), expectations)
def test_arbitrary_bytes_never_raise_anything_else(data, expected):
    _check_outcome(data, expected)


@SETTINGS
@given(valid_upload(), st.data())
def test_mutated_bodies_are_refused_or_exactly_valid(case, data):
    expected, tensors = case
    body = bytearray(pack_tensors(tensors))
    how = data.draw(st.sampled_from(["truncate", "flip", "insert", "header_length"]))
    if how == "truncate":
        body = body[: data.draw(st.integers(0, len(body) - 1))]
    elif how == "flip":
        i = data.draw(st.integers(0, len(body) - 1))
        body[i] ^= data.draw(st.integers(1, 255))
    elif how == "insert":
        i = data.draw(st.integers(0, len(body)))
        body[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    else:
        body[:8] = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1)))
    reason = _check_outcome(bytes(body), expected)
    if how in ("truncate", "insert", "header_length") and reason is None:
        # only a change that keeps the exact layout can pass, e.g. a length field rewritten to itself
        assert len(body) == len(pack_tensors(tensors))


@SETTINGS
@given(valid_upload(), st.data())
def test_each_defect_gets_its_reason(case, data):
    expected, tensors = case
    name = data.draw(st.sampled_from(sorted(tensors)))
    defect = data.draw(st.sampled_from(["missing_key", "extra_key", "wrong_dtype", "wrong_shape", "non_finite",
                                        "too_large"]))
    bad = dict(tensors)
    limit = LIMIT
    if defect == "missing_key":
        del bad[name]
    elif defect == "extra_key":
        bad[name + "_extra"] = np.zeros(2, np.float32)
        assume(name + "_extra" not in expected)
    elif defect == "wrong_dtype":
        bad[name] = bad[name].astype(data.draw(st.sampled_from([np.float64, np.float16, np.int32, np.uint8])))
    elif defect == "wrong_shape":
        bad[name] = np.zeros(tuple(expected[name]) + (data.draw(st.integers(1, 3)),), np.float32)
    elif defect == "non_finite":
        assume(bad[name].size > 0)
        flat = bad[name].reshape(-1).copy()
        flat[data.draw(st.integers(0, flat.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        bad[name] = flat.reshape(bad[name].shape)
    body = save({k: np.asarray(v, order="C") for k, v in bad.items()})
    if defect == "too_large":
        limit = len(body) - 1
    with pytest.raises(TensorValidationError) as info:
        validate_tensors(body, expected, limit)
    assert info.value.reason == defect


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)


@SETTINGS
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=5), st.binary(max_size=64))
def test_any_json_header_is_refused_as_corrupt_or_parsed(header, data_section):
    raw = json.dumps(header).encode()
    body = struct.pack("<Q", len(raw)) + raw + data_section
    try:
        parsed = read_safetensors_header(body)
    except TensorValidationError as exc:
        assert exc.reason == "corrupt"
        return
    # accepted: every entry is a well-formed tensor entry covering the data section exactly
    covered = 0
    for key, entry in parsed.items():
        if key == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        covered += end - begin
        assert end - begin == math.prod(entry["shape"]) * SAFETENSORS_DTYPE_ITEMSIZE[entry["dtype"]]
    assert covered == len(data_section)
