"""The wire codec (medfed.comm.wire): bit-exact round trips without pickle, small overhead,
and one clear error for bytes that are not a medfed message."""

import ast
import dataclasses
import json
import math
import pickle  # to make bytes the codec must refuse
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from medfed.client.upload import Upload
from medfed.comm.wire import MAGIC, MAX_DEPTH, WireError, decode, encode
from medfed.errors import DataError
from medfed.wiretypes import wire_type

WIRE_SOURCES = [Path(__file__).parents[1] / "src" / "medfed" / p for p in ("comm/wire.py", "wiretypes.py")]


def identical(a, b) -> bool:
    """Same types all the way down, same dict key order, arrays with the same dtype, shape and
    bytes, floats with the same bits (NaN payloads and -0.0 included)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, (np.ndarray, np.generic)):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, dict):
        return list(a) == list(b) and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(identical(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def _bits(hex16: str) -> float:
    return struct.unpack(">d", bytes.fromhex(hex16))[0]


def test_every_kind_of_value_round_trips_bit_for_bit():
    signalling_negative_nan = _bits("fff0000000000123")
    value = {
        "floats": [0.1, -0.0, 0.0, float("nan"), signalling_negative_nan, math.inf, -math.inf, 5e-324, 1.7976931348623157e308],
        "ints": [0, -7, 10**40, True, False, None],
        "text": ["", "site-ä", "\ud800 lone surrogate", '{"array": 0}'],  # a string that looks like a node stays a string
        "nesting": (1, [2, (3.0,)], {"inner": ()}, []),
        (2, "tuple key"): "keys need not be strings",
        7: {None: 1, 1.5: 2, False: 3},
        "scalars": [np.float64(0.25), np.float32(-0.0), np.int8(-3), np.uint64(2**64 - 1), np.bool_(True), np.complex64(1 - 2j)],
    }
    back = decode(encode(value))
    assert identical(back, value)
    assert list(back) == list(value)  # key order, not only the set of keys
    assert struct.pack(">d", back["floats"][4]) == struct.pack(">d", signalling_negative_nan)


@pytest.mark.parametrize("dtype", ["<f8", ">f8", "<f4", "<f2", "|i1", "<i2", ">i4", "<i8", "|u1", "<u4", "|b1", "<c16", ">c8"])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3, 4), (3, 0, 2)])
def test_arrays_keep_dtype_byte_order_shape_and_bytes(dtype, shape):
    raw = np.random.default_rng(0).integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    if np.dtype(dtype).kind == "b":
        raw = raw % 2
    array = raw.view(dtype).reshape(shape)  # any bit pattern, NaNs of every kind included
    back = decode(encode(array))
    assert identical(back, array)
    assert back.flags.writeable and back.flags.c_contiguous


def test_non_contiguous_arrays_come_back_equal_and_contiguous():
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    for view in (base.T, base[::2, 1::3], np.asfortranarray(base)):
        back = decode(encode({"v": view}))["v"]
        assert back.flags.c_contiguous
        np.testing.assert_array_equal(back, view)
        assert back.dtype == view.dtype and back.shape == view.shape


def test_an_upload_round_trips_and_a_decoded_array_owns_its_memory():
    upload = Upload(
        "site-a", {"weight": np.linspace(-1, 1, 7), "bias": np.array([np.nan])}, 12, "delta",
        {"loss": 0.31, "sync_seconds": np.float64(2.5)}, {"control_delta": {"weight": np.ones(7), "bias": np.zeros(1)}},
    )
    data = encode(upload)
    back = decode(data)
    assert identical(back, upload)
    back.payload["weight"][0] = 99.0  # writable, and does not write into the message
    assert identical(decode(data), upload)


def test_the_bytes_are_the_arrays_plus_a_small_header():
    """A 1e5-float model: the message is the raw array bytes plus about 300 bytes (0.04 %)."""
    payload = {"weight": np.random.default_rng(1).normal(size=100_000), "bias": np.zeros(1)}
    upload = Upload("site-a", payload, 120, "delta", {"loss": 0.5})
    raw = sum(a.nbytes for a in payload.values())
    overhead = len(encode(upload)) - raw
    assert 0 < overhead < 400, overhead
    assert overhead / raw < 1e-3


# --------------------------------------------------------------------------- malformed bytes


def _message(header, body=b"", *, magic=MAGIC):
    """Bytes in the wire layout around a hand-written header (a JSON string or an object)."""
    text = header if isinstance(header, str) else json.dumps(header)
    encoded = text.encode("utf-8")
    return magic + len(encoded).to_bytes(8, "little") + encoded + body


def _tree(node, arrays=(), body=b""):
    return _message({"arrays": list(arrays), "tree": node}, body)


F8 = {"dtype": "<f8", "shape": [2]}
MALFORMED = {
    "empty": (b"", "not a medfed wire message"),
    "pickle": (pickle.dumps({"a": np.zeros(2)}), "not a medfed wire message"),
    "other magic": (_message({"arrays": [], "tree": None}, magic=b"MEDFEDW9"), "not a medfed wire message"),
    "header past the end": (MAGIC + (10**6).to_bytes(8, "little") + b"{}", "truncated"),
    "not json": (_message("{arrays"), "not valid JSON"),
    "not utf-8": (MAGIC + (2).to_bytes(8, "little") + b"\xff\xfe", "not valid JSON"),
    "NaN token": (_message('{"arrays": [], "tree": NaN}'), "NaN is not JSON"),
    "repeated key": (_message('{"arrays": [], "tree": 1, "tree": 2}'), "repeats a key"),
    "missing tree": (_message({"arrays": []}), "'arrays' (a list) and 'tree'"),
    "object dtype": (_tree(None, [{"dtype": "|O", "shape": [1]}], b"\0" * 8), "dtype '|O' is not allowed"),
    "text dtype": (_tree(None, [{"dtype": "<U3", "shape": [1]}], b"\0" * 12), "dtype '<U3' is not allowed"),
    "structured dtype": (_tree(None, [{"dtype": [["a", "<f8"]], "shape": [1]}], b"\0" * 8), "dtype must be a plain number dtype"),
    "garbage dtype": (_tree(None, [{"dtype": "zz", "shape": [1]}]), "is not a numpy dtype"),
    "uncanonical dtype": (_tree(None, [{"dtype": "float64", "shape": [2]}], b"\0" * 16), "dtype 'float64' is not allowed"),
    "negative shape": (_tree(None, [{"dtype": "<f8", "shape": [-1]}]), "shape must be a list of whole numbers"),
    "boolean shape": (_tree(None, [{"dtype": "<f8", "shape": [True]}], b"\0" * 8), "shape must be a list of whole numbers"),
    "array bytes short": (_tree({"array": 0}, [F8], b"\0" * 15), "needs 16 bytes, 15 are left"),
    "bytes after the arrays": (_tree({"array": 0}, [F8], b"\0" * 17), "1 bytes follow the last array"),
    "missing array": (_tree({"array": 1}, [F8], b"\0" * 16), "array 1 does not exist"),
    "scalar with a shape": (_tree({"scalar": 0}, [F8], b"\0" * 16), "a scalar's is []"),
    "unknown node": (_tree({"set": [1, 2]}), "unknown node"),
    "two-key node": (_tree({"tuple": [], "dict": []}), "has one key"),
    "finite float bits": (_tree({"float": struct.pack(">d", 1.0).hex()}), "non-finite float"),
    "short float bits": (_tree({"float": "7ff8"}), "non-finite float"),
    "bad dict entry": (_tree({"dict": [["a", 1, 2]]}), "must be [key, value]"),
    "unhashable key": (_tree({"dict": [[[1], 1]]}), "cannot be a key"),
    "repeated dict key": (_tree({"dict": [["a", 1], ["a", 2]]}), "'a' appears twice"),
    "unknown type": (_tree({"dataclass": "os.system", "fields": {}}), "unknown wire type 'os.system'; registered types:"),
    "missing field": (_tree({"dataclass": "Upload", "fields": {"site": "a"}}), "Upload has the fields ['site', 'payload'"),
    "dataclass shape": (_tree({"dataclass": "Upload"}), "a dataclass node is"),
    "too deep": (_tree(json.loads("[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2))), f"nested deeper than {MAX_DEPTH}"),
    "deeper than json allows": (_message('{"arrays": [], "tree": ' + "[" * 100_000 + "]" * 100_000 + "}"), "not valid JSON"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_bytes_raise_one_clear_error_naming_the_source(name):
    data, fragment = MALFORMED[name]
    with pytest.raises(WireError) as caught:
        decode(data, source="upload from site 'b'")
    message = str(caught.value)
    assert isinstance(caught.value, DataError)
    assert message.startswith("upload from site 'b': ") and fragment in message, message
    assert "\n" not in message


def test_decode_refuses_what_is_not_bytes():
    with pytest.raises(WireError, match="wire messages are bytes, got a str"):
        decode("MEDFEDW1")


def test_every_prefix_of_a_message_is_refused_and_never_crashes_otherwise():
    data = encode(Upload("a", {"w": np.arange(3.0)}, 3, "delta", {"loss": 1.0}))
    for end in range(len(data)):
        with pytest.raises(WireError):
            decode(data[:end])


# --------------------------------------------------------------------------- what may be encoded


@dataclasses.dataclass(frozen=True)
class NotRegistered:
    x: int


class SubclassedDict(dict):
    pass


@pytest.mark.parametrize(
    "value, fragment",
    [
        ({"a": {1, 2}}, "value['a']: a builtins.set"),
        ([np.array([object()])], "value[0]: numpy dtype object"),
        ({"s": np.array(["text"])}, "numpy dtype <U4"),
        ((NotRegistered(1),), "value[0]: a test_wire.NotRegistered"),
        (OrderedDict(a=1), "a collections.OrderedDict"),
        (SubclassedDict(a=1), "a test_wire.SubclassedDict"),
        ({"f": len}, "value['f']: a builtins.builtin_function_or_method"),
        ({"when": np.datetime64("2024-01-01")}, "numpy dtype datetime64[D]"),
    ],
)
def test_encode_refuses_what_the_wire_cannot_carry_naming_where(value, fragment):
    with pytest.raises(WireError) as caught:
        encode(value)
    assert fragment in str(caught.value) and "registered with @wire_type" in str(caught.value)


def test_a_container_that_holds_itself_is_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(WireError, match="nested deeper than"):
        encode(loop)


def test_a_registered_dataclass_round_trips_and_registration_is_checked():
    @wire_type
    @dataclasses.dataclass(frozen=True)
    class WireTestPoint:
        where: tuple
        weights: dict

    point = WireTestPoint((1.0, -0.0), {"w": np.eye(2, dtype=np.float32)})
    assert identical(decode(encode([point])), [point])

    with pytest.raises(TypeError, match="registers dataclasses"):
        wire_type(SubclassedDict)

    @dataclasses.dataclass
    class Hidden:
        x: int
        y: int = dataclasses.field(init=False, default=0)

    with pytest.raises(TypeError, match="fields outside __init__"):
        wire_type(Hidden)

    @dataclasses.dataclass
    class Upload:  # another class under a registered name
        site: str

    with pytest.raises(TypeError, match="the name 'Upload' is taken by medfed.client.upload.Upload"):
        wire_type(Upload)


def test_the_codec_never_touches_pickle():
    """No pickle (or marshal, shelve, dill...) and no np.load, whose pickle path bytes could reach."""
    forbidden = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}
    for path in WIRE_SOURCES:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & forbidden, path
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in forbidden, path
            elif isinstance(node, ast.Attribute):
                assert node.attr not in ("load", "loads", "allow_pickle") or not isinstance(node.value, ast.Name) \
                    or node.value.id != "np", f"{path}: np.{node.attr}"
            elif isinstance(node, ast.keyword):
                assert node.arg != "allow_pickle", path
