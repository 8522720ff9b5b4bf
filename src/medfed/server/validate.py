"""Upload validation: the server checks every upload before it reaches an aggregator.

A malformed or malicious upload (wrong parameter names, shapes or dtypes, NaN/Inf, an
update larger than a stated bound) must not crash the round or poison the average. The
engine screens each round's uploads with :func:`screen_uploads`; rejected sites are named
in the round report with the reason, and the round goes on with the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from medfed.client.upload import Upload
from medfed.server.aggregate import StackedUploads, take_sites

NONFINITE = "contains NaN or Inf"  # the words of every rejection for non-finite values (divergence checks read them)


def upload_problem(
    upload: Upload,
    global_params: Mapping[str, np.ndarray],
    *,
    kind: str | None = None,
    max_norm: float | None = None,
) -> str | None:
    """Why the server must reject ``upload``, or ``None`` if it is well-formed.

    Checks, in order: the kind expected this round, the parameter names, each array's shape
    and dtype (real floating point), finiteness, and the L2 norm of the whole update (for
    deltas and gradients) against ``max_norm``.
    """
    if kind is not None and upload.kind != kind:
        return f"sent a {upload.kind!r} upload where {kind!r} was expected"
    if not isinstance(upload.n_examples, (int, np.integer)) or upload.n_examples < 1:
        return f"claims {upload.n_examples!r} examples; must be a positive integer"
    sent, expected = set(upload.payload), set(global_params)
    if sent != expected:
        parts = []
        if expected - sent:
            parts.append(f"missing {sorted(expected - sent)}")
        if sent - expected:
            parts.append(f"unexpected {sorted(sent - expected)}")
        return "parameter names do not match the model: " + ", ".join(parts)
    squared = 0.0
    for name, ref in global_params.items():
        value = upload.payload[name]
        if not isinstance(value, np.ndarray):
            return f"{name!r} is a {type(value).__name__}, not an array"
        if value.shape != np.shape(ref):
            return f"{name!r} has shape {value.shape}, the model's is {np.shape(ref)}"
        if value.dtype.kind != "f":
            return f"{name!r} has dtype {value.dtype}; a real floating-point array is required"
        if not np.isfinite(value).all():
            return f"{name!r} {NONFINITE}"
        squared += float(np.vdot(value, value))
    if max_norm is not None and upload.kind != "params":
        norm = squared**0.5
        if norm > max_norm:
            return f"update norm {norm:.4g} exceeds the bound {max_norm:g}"
    return None


def _extras_signature(extras: dict) -> tuple:
    """The structure of an upload's extras: names and array shapes (nested one level)."""
    out = []
    for key in sorted(extras):
        value = extras[key]
        if isinstance(value, Mapping):
            out.append((key, tuple((k, np.shape(v)) for k, v in sorted(value.items()))))
        else:
            out.append((key, np.shape(value)))
    return tuple(out)


def extras_problem(upload: Upload) -> str | None:
    """Why an upload's extras (control variates, label counts) must be refused, or ``None``.

    Extras feed server state shared by every site (SCAFFOLD's control variate, FedSLD's label
    distribution), so one NaN or non-number would corrupt them for everyone.
    """
    for key, value in upload.extras.items():
        items = value.items() if isinstance(value, Mapping) else [(None, value)]
        for sub, v in items:
            name = key if sub is None else f"{key}.{sub}"
            array = np.asarray(v)
            if array.dtype.kind not in "fiu":
                return f"extra {name!r} has dtype {array.dtype}; numbers are required"
            if not np.isfinite(array).all():
                return f"extra {name!r} {NONFINITE}"
    return None


def screen_uploads(
    uploads: Sequence[Upload],
    global_params: Mapping[str, np.ndarray],
    *,
    max_norm: float | None = None,
) -> tuple[list[Upload], dict[str, str]]:
    """Split a round's uploads into the accepted ones and ``{site: reason}`` for the rejected.

    The round's expected kind is the one most uploads share (ties: the first site's), so a
    single site sending the wrong kind is the one rejected.
    """
    kinds = [u.kind for u in uploads]
    expected = max(dict.fromkeys(kinds), key=kinds.count) if kinds else None
    accepted, rejected = [], {}
    for u in uploads:
        problem = upload_problem(u, global_params, kind=expected, max_norm=max_norm) or extras_problem(u)
        if problem is None:
            accepted.append(u)
        else:
            rejected[u.site] = problem
    # extras must have one structure to be stacked; the one most sites send is the reference
    signatures = [_extras_signature(u.extras) for u in accepted]
    if len(set(signatures)) > 1:
        reference = max(dict.fromkeys(signatures), key=signatures.count)
        kept = []
        for u, sig in zip(accepted, signatures):
            if sig == reference:
                kept.append(u)
            else:
                rejected[u.site] = f"extras {[k for k, _ in sig]} do not match the other sites' {[k for k, _ in reference]} (names or shapes)"
        accepted = kept
    return accepted, rejected


def screen_stacked(
    stack: StackedUploads,
    global_params: Mapping[str, np.ndarray],
    *,
    max_norm: float | None = None,
) -> tuple[StackedUploads | None, dict[str, str]]:
    """:func:`screen_uploads` on uploads already stacked (one kind, one structure, positive example
    counts: the vectorized executor builds them so): each row's finiteness (payload, then extras)
    and update norm checked on the stacked arrays, with the same reasons; the accepted rows (None when none) and
    ``{site: reason}`` for the rejected."""
    bad = [f"parameter names do not match the model: {sorted(stack.payload)} != {sorted(global_params)}"
           ] if stack.payload.keys() != global_params.keys() else []
    bad += [f"{name!r} has shape {v.shape[1:]}, the model's is {np.shape(global_params[name])}"
            for name, v in stack.payload.items()
            if name in global_params and v.shape[1:] != np.shape(global_params[name])]
    if bad:  # a structural fault is every row's: the executor built them all alike
        return None, dict.fromkeys(stack.sites, bad[0])
    k = len(stack.sites)
    why: dict[int, str] = {}  # row -> its first problem, in the order upload_problem checks
    squared = np.zeros(k)
    for name in global_params:
        flat = stack.payload[name].reshape(k, -1)
        for i in np.flatnonzero(~np.isfinite(flat).all(axis=1)).tolist():
            why.setdefault(i, f"{name!r} {NONFINITE}")
        squared += np.einsum("ij,ij->i", flat, flat)
    if max_norm is not None and stack.kind != "params":
        norms = np.sqrt(squared)
        for i in np.flatnonzero(norms > max_norm).tolist():
            why.setdefault(i, f"update norm {norms[i]:.4g} exceeds the bound {max_norm:g}")
    for key, value in stack.extras.items():  # extras feed state shared by every site: as extras_problem
        parts = value.items() if isinstance(value, Mapping) else [(None, value)]
        for sub, v in parts:
            name = key if sub is None else f"{key}.{sub}"
            for i in np.flatnonzero(~np.isfinite(v.reshape(k, -1)).all(axis=1)).tolist():
                why.setdefault(i, f"extra {name!r} {NONFINITE}")
    if not why:
        return stack, {}
    rejected = {stack.sites[i]: why[i] for i in sorted(why)}
    keep = np.array([i for i in range(k) if i not in why], dtype=np.intp)
    return (take_sites(stack, keep) if keep.size else None), rejected
