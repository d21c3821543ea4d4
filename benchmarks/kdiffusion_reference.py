"""k-diffusion's ``sampling`` module without importing the ``k_diffusion`` package."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Optional

# Private package name the installed k-diffusion folder is mounted under.
PACKAGE = "_k_diffusion_reference"


def load_sampling() -> Optional[types.ModuleType]:
    """The installed ``k_diffusion.sampling`` module, or None when it cannot be imported.

    ``k_diffusion/__init__.py`` imports its training stack (CLIP, pkg_resources, ...), which
    fails on some machines, while ``sampling`` needs only ``utils``: registering a bare package
    whose ``__path__`` is the installed folder lets both load as its submodules.
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = sys.modules.setdefault(PACKAGE, types.ModuleType(PACKAGE))
    package.__path__ = list(spec.submodule_search_locations)
    try:
        return importlib.import_module(f"{PACKAGE}.sampling")
    except ImportError:
        return None
