"""The upload boundary: every Upload passes here on its way from a site to the server.

This is the one place where what leaves a site is decided and measured. Sharing policies,
differential privacy, secure-aggregation masking and compression are ``UploadTransform``s
plugged in here, in order; the boundary also counts the bytes that cross it per round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from medfed.client.upload import Upload

UploadTransform = Callable[[Upload], Upload]
"""A function applied to each upload at the boundary (policy, noise, mask, codec)."""


class UploadBoundary:
    """Applies the configured transforms to each upload and counts what crosses."""

    __slots__ = ("bytes_sent", "transforms", "uploads_sent")

    def __init__(self, transforms: Sequence[UploadTransform] = ()) -> None:
        self.transforms = tuple(transforms)
        self.bytes_sent = 0
        self.uploads_sent = 0

    def transmit(self, upload: Upload) -> Upload:
        for transform in self.transforms:
            upload = transform(upload)
        self.bytes_sent += upload.nbytes
        self.uploads_sent += 1
        return upload
