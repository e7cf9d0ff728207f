"""The safetensors checkpoint format, read lazily and checked: headers against file sizes, shard
indexes against the shards they name. Knows nothing of any model family's keys.

`SafetensorsReader(directory)` opens model.safetensors if present (as transformers does), else
the shards listed in model.safetensors.index.json; `read(key, index)` returns a slice of one
tensor as a read-only view of the memory-mapped file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_dtypes
import numpy as np
from absl import logging

from moe_grok.model.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def read_json_object(path: str, what: str) -> dict:
    """A JSON object from `path`; CheckpointError naming the file (and line) if it is not one."""
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: invalid JSON in the {what} (line {err.lineno}, column {err.colno}: "
                              f"{err.msg})") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path}: the {what} is not UTF-8 text ({err.reason})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object, got {type(value).__name__}")
    return value



_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
           "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
WEIGHT_DTYPES = ("F64", "F32", "F16", "BF16")  # what a weight may be stored as (no integer / quantized tensors)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies: its file, safetensors dtype name, shape and absolute byte offset."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    offset: int


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Every tensor of a .safetensors file, checked against the file's size (a truncated or
    corrupt file raises CheckpointError naming it, and the tensor its data would lie past)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if header_size < 0 or header_size > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes; its header "
                                  f"length field says {header_size} bytes)")
        raw = f.read(header_size)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_size
    tensors = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(int(n) for n in meta["shape"]), meta["data_offsets"]
        except (TypeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r} ({err!r})") from None
        if dtype in _DTYPES and end - begin != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
            raise CheckpointError(f"{path}: corrupt safetensors header: {key!r} of shape {shape} and dtype {dtype} "
                                  f"spans {end - begin} bytes")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {key!r} needs bytes up to {data_start + end}, the file "
                                  f"has {size}")
        tensors[key] = TensorInfo(path, dtype, shape, data_start + begin)
    return tensors


class SafetensorsReader:
    """Lazy, sliceable access to every tensor of a (possibly sharded) safetensors checkpoint.

    model.safetensors wins over an index beside it, as in transformers' from_pretrained.
    Every file's header is read and checked up front.
    """

    def __init__(self, ckpt_dir: str):
        self.directory = ckpt_dir
        single, index_path = os.path.join(ckpt_dir, SINGLE_FILE), os.path.join(ckpt_dir, INDEX_FILE)
        if os.path.exists(single):
            if os.path.exists(index_path):
                logging.warning("%s holds both %s and %s: reading %s, as transformers does", ckpt_dir, SINGLE_FILE,
                                INDEX_FILE, SINGLE_FILE)
            self._tensors = read_safetensors_header(single)
        elif os.path.exists(index_path):
            self._tensors = self._read_index(ckpt_dir, index_path)
        else:
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {ckpt_dir}")

    @staticmethod
    def _read_index(ckpt_dir: str, index_path: str) -> dict[str, TensorInfo]:
        weight_map = read_json_object(index_path, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path}: no \"weight_map\" object of key -> shard file name")
        shards = {}
        for name in sorted(set(weight_map.values())):
            path = os.path.join(ckpt_dir, name)
            if not os.path.isfile(path):
                raise CheckpointError(f"{index_path} names shard {name}, which is missing from {ckpt_dir}")
            shards[name] = read_safetensors_header(path)
        tensors = {}
        for key, name in weight_map.items():
            if key not in shards[name]:
                actual = [other for other, held in shards.items() if key in held]
                raise CheckpointError(f"{index_path} maps {key!r} to {name}, which does not hold it"
                                      + (f" ({actual[0]} does)" if actual else ""))
            tensors[key] = shards[name][key]
        return tensors

    def keys(self) -> set[str]:
        return set(self._tensors)

    def info(self, key: str) -> TensorInfo:
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._tensors[key].shape

    def read(self, key: str, index: tuple = ()) -> np.ndarray:
        """tensor[index] as a read-only view of the memory-mapped file (bfloat16 as ml_dtypes.bfloat16).

        The mapping lives as long as the view: copy what you keep."""
        info = self._tensors[key]
        if info.dtype not in _DTYPES:
            raise CheckpointError(f"{info.path}: tensor {key!r} has dtype {info.dtype}, which moe_grok cannot read")
        if not math.prod(info.shape):
            return np.zeros(info.shape, _DTYPES[info.dtype])[index]
        return np.memmap(info.path, _DTYPES[info.dtype], mode="r", offset=info.offset, shape=info.shape)[index]
