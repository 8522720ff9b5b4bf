"""Wire bytes: what crosses between the coordinator and a site, and what a checkpoint stores.

:func:`encode` turns a tree of values into bytes and :func:`decode` rebuilds it, without
pickle: a site must never run code chosen by bytes from the network, so decoding only parses
JSON and copies array bytes, and rebuilds no class but the dataclasses registered with
:func:`medfed.wiretypes.wire_type` (client and server states, :class:`~medfed.client.upload.Upload`).

The tree may hold ``None``, ``bool``, ``int``, ``float``, ``str``, ``list``, ``tuple``,
``dict`` (any of these scalars or tuples of them as keys), numpy arrays and numpy scalars
(boolean, integer, unsigned, floating or complex dtypes) and registered dataclasses. Each
comes back as the same type with the same value, bit for bit: arrays keep dtype (byte order
included) and shape, floats keep NaN payloads, infinities and ``-0.0``, dicts keep their key
order, a tuple stays a tuple. Arrays come back C-contiguous and writable whatever their
memory layout was.

Format (version 1), chosen so that the bytes are the arrays' own plus a small header::

    b"MEDFEDW1" | header length (8 bytes, little-endian) | header (UTF-8 JSON) | array bytes

The header is ``{"arrays": [{"dtype": "<f8", "shape": [3, 4]}, ...], "tree": NODE}``; the
array bytes follow it back to back, in that order, and nothing follows them. A NODE is a
JSON ``null``, ``true``/``false``, integer, finite float or string for the same Python value,
a JSON list for a ``list``, or a one-key object: ``{"tuple": [NODE, ...]}``,
``{"dict": [[KEY, VALUE], ...]}``, ``{"float": "7ff8000000000000"}`` (a non-finite float's
IEEE-754 bits, big-endian hex), ``{"array": i}`` or ``{"scalar": i}`` (entry ``i`` of
``arrays``; a scalar's shape is ``[]``), and the two-key
``{"dataclass": NAME, "fields": {FIELD: NODE, ...}}``.

Bytes that do not follow the format, name an unregistered type or nest deeper than
:data:`MAX_DEPTH` raise :class:`WireError`, one line saying where and what is allowed.
The codec checks structure only: what a decoded value means (an upload's shapes, its
finiteness) is for its receiver to check, as the server screens uploads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any

import numpy as np

from medfed.errors import DataError
from medfed.wiretypes import wire_class, wire_name, wire_names

MAGIC = b"MEDFEDW1"
_LENGTH = 8  # bytes of the header length
MAX_DEPTH = 64  # nesting of containers; a chain's state is about 6 deep
ARRAY_KINDS = "biufc"  # boolean, signed, unsigned, floating, complex: plain numbers only
_CARRIES = (
    "None, bool, int, float, str, list, tuple, dict, numpy arrays and scalars of kinds bool, int, "
    "uint, float, complex, and dataclasses registered with @wire_type"
)


class WireError(DataError):
    """Bytes that are not a medfed wire message, or a value the wire cannot carry. A receiver
    catches it to refuse one message (a site's upload) without stopping the others."""


# --------------------------------------------------------------------------- encode


def encode(value: Any) -> bytes:
    """The wire bytes of ``value`` (see the module's docstring for what it may hold)."""
    arrays: list[np.ndarray] = []
    tree = _encode(value, arrays, "value", 0)
    table = [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]
    header = json.dumps({"arrays": table, "tree": tree}, separators=(",", ":"), allow_nan=False).encode("utf-8")
    # a contiguous array is its own buffer: join copies each array's bytes once, into the message
    body = [np.ascontiguousarray(a) for a in arrays]
    return b"".join([MAGIC, len(header).to_bytes(_LENGTH, "little"), header, *body])


def _encode(value: Any, arrays: list[np.ndarray], path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise WireError(f"cannot encode {path}: nested deeper than {MAX_DEPTH} (or a container that holds itself)")
    kind = type(value)
    if value is None or kind in (bool, int, str):
        return value
    if kind is float:
        return value if math.isfinite(value) else {"float": struct.pack(">d", value).hex()}
    if kind is list:
        return [_encode(v, arrays, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if kind is tuple:
        return {"tuple": [_encode(v, arrays, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]}
    if kind is dict:
        return {"dict": [
            [_encode(k, arrays, f"{path} key {k!r}", depth + 1), _encode(v, arrays, f"{path}[{k!r}]", depth + 1)]
            for k, v in value.items()
        ]}
    if kind is np.ndarray or isinstance(value, np.generic):
        if value.dtype.kind not in ARRAY_KINDS:
            raise WireError(f"cannot encode {path}: numpy dtype {value.dtype} is not a plain number type; {_CARRIES}")
        arrays.append(np.asarray(value))
        return {"array" if kind is np.ndarray else "scalar": len(arrays) - 1}
    name = wire_name(kind)
    if name is not None:
        fields = {
            f.name: _encode(getattr(value, f.name), arrays, f"{path}.{f.name}", depth + 1)
            for f in dataclasses.fields(value)
        }
        return {"dataclass": name, "fields": fields}
    raise WireError(f"cannot encode {path}: a {kind.__module__}.{kind.__qualname__}; the wire carries {_CARRIES}")


# --------------------------------------------------------------------------- decode


def decode(data: bytes, source: str = "wire bytes") -> Any:
    """The value :func:`encode` turned into ``data``; ``source`` (a site, a file) names the bytes in errors."""
    try:
        data = memoryview(data).cast("B")
    except TypeError:
        raise WireError(f"{source}: wire messages are bytes, got a {type(data).__name__}") from None
    start = len(MAGIC) + _LENGTH
    if len(data) < start or data[: len(MAGIC)] != MAGIC:
        raise WireError(f"{source}: not a medfed wire message (it must start with {MAGIC!r})")
    length = int.from_bytes(data[len(MAGIC) : start], "little")
    if length > len(data) - start:
        raise WireError(f"{source}: the header claims {length} bytes, {len(data) - start} follow: truncated")
    try:
        header = json.loads(
            str(data[start : start + length], "utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WireError(f"{source}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict) or set(header) != {"arrays", "tree"} or not isinstance(header["arrays"], list):
        raise WireError(f"{source}: the header must be an object with 'arrays' (a list) and 'tree'")
    arrays = _read_arrays(header["arrays"], data[start + length :], source)
    return _Decoder(arrays, source).node(header["tree"], "value", 0)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError(f"a JSON object repeats a key among {[k for k, _ in pairs]}")
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (non-finite floats are written as their bits)")


def _read_arrays(table: list, body: memoryview, source: str) -> list[np.ndarray]:
    arrays, offset = [], 0
    for i, entry in enumerate(table):
        where = f"{source}: array {i}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape"}:
            raise WireError(f"{where}: an entry must be {{\"dtype\": ..., \"shape\": [...]}}, got {entry!r}")
        descr, shape = entry["dtype"], entry["shape"]
        dtype = _dtype(descr, where)
        if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
            raise WireError(f"{where}: shape must be a list of whole numbers >= 0, got {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > len(body) - offset:
            raise WireError(f"{where} ({descr}, shape {shape}) needs {nbytes} bytes, {len(body) - offset} are left: truncated")
        flat = np.frombuffer(body[offset : offset + nbytes], dtype=dtype)
        arrays.append(flat.reshape(shape).copy())  # a copy: writable, and free of the message's buffer
        offset += nbytes
    if offset != len(body):
        raise WireError(f"{source}: {len(body) - offset} bytes follow the last array; the message is malformed")
    return arrays


def _dtype(descr: Any, where: str) -> np.dtype:
    allowed = "a plain number dtype such as '<f8', '<i8', '|b1' (kinds bool, int, uint, float, complex)"
    if not isinstance(descr, str):
        raise WireError(f"{where}: dtype must be {allowed}, got {descr!r}")
    try:
        dtype = np.dtype(descr)
    except TypeError:
        raise WireError(f"{where}: dtype {descr!r} is not a numpy dtype; allowed: {allowed}") from None
    if dtype.kind not in ARRAY_KINDS or dtype.str != descr:
        raise WireError(f"{where}: dtype {descr!r} is not allowed; allowed: {allowed}")
    return dtype


class _Decoder:
    """Rebuilds a tree from its JSON nodes and the message's arrays."""

    def __init__(self, arrays: list[np.ndarray], source: str) -> None:
        self.arrays = arrays
        self.source = source

    def fail(self, path: str, problem: str) -> WireError:
        return WireError(f"{self.source}: {path}: {problem}")

    def node(self, node: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nested deeper than {MAX_DEPTH}")
        if node is None or type(node) in (bool, int, float, str):
            return node
        if type(node) is list:
            return [self.node(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node)]
        if type(node) is not dict or not node:
            raise self.fail(path, f"{node!r} is not a wire node")
        if "dataclass" in node:
            return self.dataclass(node, path, depth)
        if len(node) != 1:
            raise self.fail(path, f"a node other than a dataclass has one key, got {sorted(node)}")
        tag, body = next(iter(node.items()))
        if tag == "tuple" and type(body) is list:
            return tuple(self.node(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(body))
        if tag == "dict" and type(body) is list:
            return self.mapping(body, path, depth)
        if tag == "float" and type(body) is str:
            return self.float_bits(body, path)
        if tag in ("array", "scalar") and type(body) is int:
            return self.array(tag, body, path)
        raise self.fail(path, f"unknown node {node!r}; nodes: tuple, dict, float, array, scalar, dataclass")

    def mapping(self, pairs: list, path: str, depth: int) -> dict:
        out: dict = {}
        for i, pair in enumerate(pairs):
            if type(pair) is not list or len(pair) != 2:
                raise self.fail(path, f"dict entry {i} must be [key, value], got {pair!r}")
            key = self.node(pair[0], f"{path} key {i}", depth + 1)
            try:
                hash(key)
            except TypeError:
                raise self.fail(path, f"dict key {i} is a {type(key).__name__}, which cannot be a key") from None
            if key in out:
                raise self.fail(path, f"dict key {key!r} appears twice")
            out[key] = self.node(pair[1], f"{path}[{key!r}]", depth + 1)
        return out

    def float_bits(self, bits: str, path: str) -> float:
        try:
            value = struct.unpack(">d", bytes.fromhex(bits))[0] if len(bits) == 16 else None
        except ValueError:
            value = None
        if value is None or math.isfinite(value):
            raise self.fail(path, f"a float node holds the 16 hex digits of a non-finite float, got {bits!r}")
        return value

    def array(self, tag: str, index: int, path: str) -> Any:
        if not 0 <= index < len(self.arrays):
            raise self.fail(path, f"{tag} {index} does not exist; the message has {len(self.arrays)} array(s)")
        array = self.arrays[index]
        if tag == "array":
            return array
        if array.shape != ():
            raise self.fail(path, f"scalar {index} has shape {list(array.shape)}; a scalar's is []")
        return array[()]

    def dataclass(self, node: dict, path: str, depth: int) -> Any:
        name, fields = node.get("dataclass"), node.get("fields")
        if set(node) != {"dataclass", "fields"} or type(name) is not str or type(fields) is not dict:
            raise self.fail(path, f"a dataclass node is {{\"dataclass\": NAME, \"fields\": {{...}}}}, got keys {sorted(node)}")
        cls = wire_class(name)
        if cls is None:
            raise self.fail(path, f"unknown wire type {name!r}; registered types: {', '.join(wire_names())}")
        expected = [f.name for f in dataclasses.fields(cls)]
        if sorted(fields) != sorted(expected):
            raise self.fail(path, f"{name} has the fields {expected}, the message gives {list(fields)}")
        return cls(**{k: self.node(v, f"{path}.{k}", depth + 1) for k, v in fields.items()})
