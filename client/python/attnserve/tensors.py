"""numpy arrays to and from attnserve.v1.Tensor messages (raw little-endian bytes, as the server answers)."""

import numpy as np

from attnserve.v1 import attention_pb2 as pb

# The element types a client may ask its answer in (output_dtype).
DTYPES = {"float32": pb.FLOAT32, "bfloat16": pb.BFLOAT16, "float16": pb.FLOAT16}


def to_tensor(array):
    """A bool array as BOOL (one byte per element), any other as FLOAT32 (float16 widened): masks and session
    memory, which the server takes in those types only. A Tensor message is taken as it is."""
    if isinstance(array, pb.Tensor):
        return array
    a = np.asarray(array)
    if a.dtype == np.bool_:
        return pb.Tensor(shape=list(a.shape), dtype=pb.BOOL, raw_data=np.ascontiguousarray(a, np.uint8).tobytes())
    return pb.Tensor(shape=list(a.shape), dtype=pb.FLOAT32, raw_data=np.ascontiguousarray(a, "<f4").tobytes())


def to_activation(array, dtype=None):
    """A query, key or value: a float16 array as FLOAT16 (half the bytes, used by the server as sent); with
    dtype="bfloat16", an array of bfloat16 bit patterns (uint16 or int16, e.g. torch's bfloat16 viewed as
    int16) as BFLOAT16; anything else as to_tensor sends it."""
    if dtype == "bfloat16":
        a = np.asarray(array)
        if a.dtype not in (np.uint16, np.int16):
            raise TypeError(f"dtype='bfloat16' takes bfloat16 bit patterns (uint16 or int16), got {a.dtype}")
        return pb.Tensor(shape=list(a.shape), dtype=pb.BFLOAT16, raw_data=np.ascontiguousarray(a, "<u2").tobytes())
    if dtype is not None:
        raise ValueError(f"dtype: expected None or 'bfloat16', got {dtype!r}")
    if not isinstance(array, pb.Tensor) and np.asarray(array).dtype == np.float16:
        a = np.asarray(array)
        return pb.Tensor(shape=list(a.shape), dtype=pb.FLOAT16, raw_data=np.ascontiguousarray(a, "<f2").tobytes())
    return to_tensor(array)


def from_tensor(tensor):
    """The float32 array of a FLOAT32, BFLOAT16 or FLOAT16 tensor, widened exactly (a copy: the message may
    go away)."""
    shape = tuple(tensor.shape)
    if tensor.dtype == pb.BFLOAT16:
        bits = np.frombuffer(tensor.raw_data, "<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if tensor.dtype == pb.FLOAT16:
        return np.frombuffer(tensor.raw_data, "<f2").astype(np.float32).reshape(shape)
    return np.frombuffer(tensor.raw_data, "<f4").reshape(shape).copy()
