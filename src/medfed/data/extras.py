"""The optional imaging extra (torch, nibabel, pydicom, nilearn, Pillow): imported when used.

Without it, a table run works and an image run stops with one line that names the missing
package and the command that installs the extra. torch comes first, from PyTorch's CPU wheel
index, because a bare ``pip install torch`` (what the extra alone would do) may pull a
multi-gigabyte CUDA build.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from medfed.errors import DataError

TORCH_CPU_INSTALL = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
IMAGING_INSTALL = f'{TORCH_CPU_INSTALL} && pip install "medfed[imaging]"'

# import name -> the distribution pip installs it from
_PACKAGES = {"PIL": "Pillow"}


def missing_extra(module: str, needed_by: str) -> str:
    """``"{needed_by} needs {package} (the imaging extra): {install command}"``."""
    package = _PACKAGES.get(module.split(".")[0], module.split(".")[0])
    return f"{needed_by} needs {package} (the imaging extra): {IMAGING_INSTALL}"


def import_extra(module: str, needed_by: str) -> ModuleType:
    """Import ``module`` of the imaging extra, or raise a DataError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(missing_extra(module, needed_by)) from None
