"""Sharing policy (Yang et al., 2021c; Li et al., 2019): which parameter names may leave a site.

Partial-sharing methods (FedBN's local normalization layers, FedPer's private head) keep
some parameters at the site. The policy is enforced at the upload boundary: an upload
that carries a private name is refused before it is transmitted, whatever the client rule
did, so "private parameters never appear in any upload" holds by construction.
"""

from __future__ import annotations

from collections.abc import Callable

from medfed.client.upload import Upload
from medfed.errors import MedfedError


class SharingViolation(MedfedError):
    """A site tried to upload a parameter its sharing policy keeps private."""


def sharing_policy(is_private: Callable[[str], bool]) -> Callable[[Upload], Upload]:
    """An upload transform that refuses any upload naming a private parameter."""

    def enforce(upload: Upload) -> Upload:
        leaked = sorted(k for k in upload.payload if is_private(k))
        if leaked:
            raise SharingViolation(
                f"site {upload.site!r} tried to upload private parameter(s) {leaked}; the sharing "
                "policy keeps them at the site"
            )
        return upload

    return enforce
