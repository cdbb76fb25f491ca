"""numpy arrays to and from attnserve.v1.Tensor messages (raw little-endian bytes, as the server answers)."""

import numpy as np

from attnserve.v1 import attention_pb2 as pb


def to_tensor(array):
    """A float array as FLOAT32, a bool array as BOOL (one byte per element)."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        return pb.Tensor(shape=list(a.shape), dtype=pb.BOOL, raw_data=np.ascontiguousarray(a, np.uint8).tobytes())
    return pb.Tensor(shape=list(a.shape), dtype=pb.FLOAT32, raw_data=np.ascontiguousarray(a, "<f4").tobytes())


def from_tensor(tensor):
    """The float32 array of a FLOAT32 tensor (a copy: the message may go away)."""
    return np.frombuffer(tensor.raw_data, "<f4").reshape(tuple(tensor.shape)).copy()
