"""Communication (survey §3.4): the single upload boundary between a site and the server."""

from medfed.comm.boundary import UploadBoundary, UploadTransform

__all__ = ["UploadBoundary", "UploadTransform"]
