"""The allowlist of dataclasses that medfed's wire codec (:mod:`medfed.comm.wire`) may rebuild.

Bytes from the network must never choose what code runs: the codec rebuilds a dataclass only
when its type name is registered here, with :func:`wire_type`, by the module that defines it.
The registry sits below every layer (like :mod:`medfed.errors`) so that a client state, a
server state and an :class:`~medfed.client.upload.Upload` register where they are defined;
the codec itself is communication and lives in ``medfed.comm``. A type is known once its
module is imported, which building the method that uses it does.
"""

from __future__ import annotations

import dataclasses

_REGISTRY: dict[str, type] = {}


def wire_type(cls: type) -> type:
    """Class decorator: let the wire codec encode ``cls`` and rebuild it from bytes, by its name.

    ``cls`` must be a dataclass whose fields are all ``__init__`` arguments (the codec rebuilds
    it as ``cls(**fields)``), and its name must be unique among registered types, since the
    name is what the bytes carry.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"wire_type registers dataclasses; {cls!r} is not one")
    hidden = [f.name for f in dataclasses.fields(cls) if not f.init]
    if hidden:
        raise TypeError(f"wire_type: {cls.__name__} has fields outside __init__ ({hidden}); the codec could not rebuild it")
    name = cls.__name__
    known = _REGISTRY.get(name)
    # the same class defined again (a module reloaded) replaces itself; another class may not take its name
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise TypeError(f"wire_type: the name {name!r} is taken by {known.__module__}.{known.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def wire_class(name: str) -> type | None:
    """The registered dataclass called ``name``, or None."""
    return _REGISTRY.get(name)


def wire_name(cls: type) -> str | None:
    """The name ``cls`` is registered under, or None when it is not registered."""
    return cls.__name__ if _REGISTRY.get(cls.__name__) is cls else None


def wire_names() -> list[str]:
    """Every registered type name, sorted (what an error about an unknown name lists)."""
    return sorted(_REGISTRY)
