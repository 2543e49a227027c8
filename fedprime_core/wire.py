"""The wire format of exchanged arrays: float32, float16 or bfloat16, and update deltas.

Framework-free codecs; ``fedprime_protocol/messages.py`` applies them to Flower's ArrayRecords in
both directions and tags every record with the encoding, so a receiver decodes what the
sender says it sent (never what its own run config assumes).

* ``float32``: the arrays as they are (what every method exchanged before ``wire-dtype``).
* ``float16``: IEEE half precision (11 significant bits, largest finite value 65504).
  A finite value beyond that range would become ``inf`` in the cast; :func:`encode_array`
  refuses it with :class:`WireRangeError` naming the array, so it is never sent as an
  ``inf`` that the receiver would then reject as if the client had diverged. NaN and
  ``inf`` that were there before the cast stay NaN and ``inf`` (the receiver's validator
  rejects them as such).
* ``bfloat16``: the upper 16 bits of the float32 pattern (8 significant bits, float32's
  range), rounded to nearest even. NumPy has no bfloat16 dtype, and Flower's ``Array``
  carries NumPy arrays (``np.save``), so a bfloat16 array travels as ``uint16`` holding
  those bits; the record's tag says they are bfloat16. Decoding shifts them back into a
  float32 pattern, exactly.

Every decoded array is float32; servers and clients compute and accumulate in float32 or
wider (FedAvg in float64).

**Deltas** (``upload-delta``): a client can upload ``trained - received`` instead of the
trained arrays, and the server adds the decoded delta to the float32 arrays it sent that
client (:func:`apply_delta`). With a 16-bit ``wire-dtype`` the cast then rounds the
round's small update instead of the weights: a key that moves by 1e-5 in a round keeps
that move, where rounding the weight itself (about 0.05, spacing 3e-5 in float16) would
drop it. The server's global state never goes through the cast: what the client started
from was rounded, but the server applies the client's change to its own float32 copy.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

WIRE_DTYPES = ("float32", "float16", "bfloat16")

#: What each wire dtype's arrays are stored as in an ArrayRecord.
STORAGE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}

#: Unit roundoff (half the spacing of numbers in [1, 2)) of each wire dtype: an encoded and
#: decoded value ``y`` of ``x`` satisfies ``|y - x| <= unit_roundoff * |x|`` (normal range).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}

#: Largest finite magnitude of each wire dtype.
LARGEST = {"float32": float(np.finfo(np.float32).max), "float16": 65504.0, "bfloat16": 3.3895313892515355e38}


class WireRangeError(ValueError):
    """A finite value cannot be represented in the wire dtype (it would become ``inf``)."""


def _check_dtype(dtype: str) -> None:
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {dtype!r}; use one of: {', '.join(WIRE_DTYPES)}")


def _float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """``uint16`` bfloat16 patterns of float32 ``values``, rounded to nearest even (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    with np.errstate(over="ignore"):
        upper = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # rounding could carry a NaN's payload into the sign bit: keep a quiet NaN
        upper[nan] = np.uint16(0x7FC0) | ((bits[nan] >> 16).astype(np.uint16) & np.uint16(0x8000))
    return upper


def _bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode_array(name: str, values: np.ndarray, dtype: str) -> np.ndarray:
    """The array as it travels in ``dtype`` (float32, float16, or bfloat16 bits as uint16).

    Args:
        name: the array's name (for the error message).
        values: any floating array (cast to float32 first); non-floating arrays are
            returned unchanged, so the receiver's validator can reject them by dtype.
        dtype: one of :data:`WIRE_DTYPES`.

    Raises:
        WireRangeError: a finite value lies beyond the dtype's range.
    """
    _check_dtype(dtype)
    values = np.asarray(values)
    if values.dtype.kind != "f":
        return np.ascontiguousarray(values)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if dtype == "float32":
        return values
    with np.errstate(over="ignore"):
        encoded = values.astype(np.float16) if dtype == "float16" else _float32_to_bfloat16_bits(values)
    decoded = encoded if dtype == "float16" else _bfloat16_bits_to_float32(encoded)
    if not np.isfinite(decoded).all():
        overflow = np.isfinite(values) & ~np.isfinite(decoded)
        if overflow.any():
            worst = float(np.abs(values[overflow]).max())
            raise WireRangeError(
                f"array {name!r} holds {int(overflow.sum())} finite value(s) beyond {dtype}'s range "
                f"(largest |value| {worst:.4g} > {LARGEST[dtype]:.6g}); they would arrive as inf. "
                f"Use wire-dtype='bfloat16' (float32's range) or 'float32'"
            )
    return encoded


def decode_array(name: str, values: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 array of a received ``values`` encoded in ``dtype``.

    ``float32``: any floating array is cast to float32; non-floating arrays are returned
    unchanged (the validator rejects them by dtype).

    Raises:
        ValueError: the array's storage does not match ``dtype`` (e.g. float32 values in a
            record tagged float16, or anything but uint16 under bfloat16), or a wider float
            array under ``float32`` holds finite values beyond float32's range (they would
            become inf).
    """
    _check_dtype(dtype)
    values = np.asarray(values)
    if dtype == "float32":
        if values.dtype.kind != "f":
            return values
        if values.dtype.itemsize > 4:
            beyond = np.isfinite(values) & (np.abs(values) > LARGEST["float32"])
            if beyond.any():
                raise ValueError(
                    f"array {name!r} ({values.dtype}) holds {int(beyond.sum())} finite value(s) beyond float32's "
                    f"range (largest |value| {float(np.abs(values[beyond]).max()):.4g} > {LARGEST['float32']:.6g})"
                )
        return values.astype(np.float32)
    if values.dtype != STORAGE_DTYPES[dtype]:
        raise ValueError(
            f"array {name!r} arrived as {values.dtype} but the record says {dtype} (stored as {STORAGE_DTYPES[dtype]})"
        )
    if dtype == "float16":
        return values.astype(np.float32)
    return _bfloat16_bits_to_float32(values)


def encode_state(state: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """:func:`encode_array` of every array (names kept)."""
    return {name: encode_array(name, value, dtype) for name, value in state.items()}


def decode_state(state: Mapping[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """:func:`decode_array` of every array (names kept)."""
    return {name: decode_array(name, value, dtype) for name, value in state.items()}


def state_delta(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``trained - received`` per name, in float32.

    An array whose name is not in ``received``, or whose shape differs from it, is left as
    it is: it cannot be a delta, and the receiver's validator rejects it by name or shape.
    """
    out = {}
    for name, value in trained.items():
        value = np.asarray(value)
        base = received.get(name)
        if base is None or np.shape(base) != value.shape or value.dtype.kind != "f":
            out[name] = value
        else:
            out[name] = value.astype(np.float32) - np.asarray(base, dtype=np.float32)
    return out


def apply_delta(sent: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``sent + delta`` per name: the arrays a client trained, from the float32 arrays it was sent.

    Names or shapes that do not match ``sent`` are passed through unchanged, so the
    validator names them (missing, unexpected, wrong shape); NaN or inf in a delta stay in
    the sum and are rejected there too.
    """
    out = {}
    for name, value in delta.items():
        value = np.asarray(value)
        base = sent.get(name)
        if base is None or np.shape(base) != value.shape or value.dtype.kind != "f":
            out[name] = value
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                out[name] = np.asarray(base, dtype=np.float32) + value.astype(np.float32)
    return out
