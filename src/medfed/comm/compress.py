"""Compression of uploads (survey §3.4.2): what crosses the network, made smaller.

A codec encodes a site's update at the site and the server decodes it before screening and
aggregation; the bytes a round reports are the encoded ones.

- ``lossless``: the float64 bytes deflated (zlib); decodes to the same bits, so a run is
  bit-identical to one without compression.
- ``q8`` / ``q4``: unbiased stochastic quantization to 2^8 / 2^4 levels between each tensor's
  minimum and maximum (Alistarh et al., 2017, QSGD's stochastic rounding, per tensor): a value
  rounds up with the probability of its distance to the lower level, so its expectation is
  the value itself; 4-bit codes are packed two to a byte.
- ``topk:F``: the largest ``F`` share of entries by magnitude, sent as indices and values,
  with **error feedback** (Stich et al., 2018): what a round leaves out is kept as site state
  and added to the next round's update, so nothing is lost for good.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from medfed.client.upload import Upload
from medfed.errors import ConfigError, DataError
from medfed.rng import KeyedRng
from medfed.wiretypes import wire_type

Params = dict[str, np.ndarray]
CODECS = ("none", "lossless", "q8", "q4", "topk:FRACTION")


@wire_type
@dataclass(frozen=True)
class ErrorFeedback:
    """A site's residual: what top-k left out of its updates so far, in the parameter view."""

    residual: dict[str, np.ndarray]


@dataclass(frozen=True)
class Codec:
    """``name`` (``lossless``, ``q8``, ``q4`` or ``topk``) and, for top-k, the share kept."""

    name: str
    fraction: float = 1.0

    @property
    def stateful(self) -> bool:
        return self.name == "topk"

    # -- at the site ---------------------------------------------------------------------
    def encode(self, upload: Upload, state: ErrorFeedback | None, rng: KeyedRng) -> tuple[Upload, ErrorFeedback | None]:
        payload = {k: np.asarray(v, dtype=np.float64) for k, v in upload.payload.items()}
        if self.name == "lossless":
            encoded = {k: np.frombuffer(zlib.compress(np.ascontiguousarray(v).tobytes(), 6), dtype=np.uint8)
                       for k, v in payload.items()}
            return _with(upload, encoded), state
        if self.name in ("q8", "q4"):
            gen = rng.generator
            encoded = {}
            for k, v in payload.items():
                codes, low, high = _quantize(v.ravel(), 8 if self.name == "q8" else 4, gen)
                encoded[f"{k}/codes"], encoded[f"{k}/range"] = codes, np.array([low, high])
            return _with(upload, encoded), state
        residual = state.residual if state is not None else {k: np.zeros_like(v) for k, v in payload.items()}
        encoded, left = {}, {}
        for k, v in payload.items():
            full = (v + residual[k]).ravel()
            keep = max(1, math.ceil(self.fraction * full.size))
            idx = np.sort(np.argpartition(np.abs(full), full.size - keep)[full.size - keep:]).astype(np.uint32)
            encoded[f"{k}/index"], encoded[f"{k}/value"] = idx, full[idx]
            rest = full.copy()
            rest[idx] = 0.0
            left[k] = rest.reshape(v.shape)
        return _with(upload, encoded), ErrorFeedback(left)

    # -- at the server -------------------------------------------------------------------
    def decode(self, upload: Upload, shapes: Mapping[str, tuple[int, ...]]) -> Upload:
        """The upload's update in the parameter view; a DataError when it does not fit ``shapes``."""
        try:
            if self.name == "lossless":
                payload = {k: np.frombuffer(zlib.decompress(upload.payload[k].tobytes()), dtype=np.float64)
                           .reshape(shape).copy() for k, shape in shapes.items() if k in upload.payload}
            elif self.name in ("q8", "q4"):
                payload = {}
                for k, shape in shapes.items():
                    if f"{k}/codes" in upload.payload:
                        low, high = upload.payload[f"{k}/range"]
                        size = int(np.prod(shape))
                        payload[k] = _dequantize(upload.payload[f"{k}/codes"], 8 if self.name == "q8" else 4,
                                                 float(low), float(high), size).reshape(shape)
            else:
                payload = {}
                for k, shape in shapes.items():
                    if f"{k}/index" in upload.payload:
                        full = np.zeros(int(np.prod(shape)))
                        full[upload.payload[f"{k}/index"].astype(np.int64)] = upload.payload[f"{k}/value"]
                        payload[k] = full.reshape(shape)
        except (KeyError, ValueError, IndexError, zlib.error) as exc:
            raise DataError(f"the {self.name} upload of site {upload.site!r} does not decode: {exc}") from None
        return _with(upload, payload)


def _with(upload: Upload, payload: Params) -> Upload:
    return Upload(upload.site, payload, upload.n_examples, upload.kind, upload.metrics, upload.extras)


def _quantize(v: np.ndarray, bits: int, gen: np.random.Generator) -> tuple[np.ndarray, float, float]:
    levels = 2**bits - 1
    low, high = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
    if high <= low:
        codes = np.zeros(v.size, dtype=np.uint8)
    else:
        t = (v - low) / (high - low) * levels
        base = np.floor(t)
        codes = np.minimum(base + (gen.random(v.size) < t - base), levels).astype(np.uint8)
    if bits == 4:  # two codes a byte
        padded = np.concatenate([codes, np.zeros(codes.size % 2, dtype=np.uint8)])
        codes = (padded[0::2] << 4 | padded[1::2]).astype(np.uint8)
    return codes, low, high


def _dequantize(codes: np.ndarray, bits: int, low: float, high: float, size: int) -> np.ndarray:
    if bits == 4:
        codes = np.stack([codes >> 4, codes & 0x0F], axis=1).ravel()[:size]
    if codes.size != size:
        raise ValueError(f"{codes.size} codes for {size} values")
    levels = 2**bits - 1
    return low + codes.astype(np.float64) * ((high - low) / levels) if high > low else np.full(size, low)


def make_codec(spec: str | None) -> Codec | None:
    """``none`` -> None; ``lossless``, ``q8``, ``q4``, ``topk:F`` (0 < F <= 1) -> the codec."""
    text = (spec or "none").strip().lower()
    if text == "none":
        return None
    if text in ("lossless", "q8", "q4"):
        return Codec(text)
    name, _, share = text.partition(":")
    if name == "topk":
        try:
            fraction = float(share)
        except ValueError:
            fraction = -1.0
        if 0 < fraction <= 1:
            return Codec("topk", fraction)
    raise ConfigError(f"--compress {spec!r}: use {', '.join(CODECS)} (e.g. topk:0.1 keeps the largest 10%)")
