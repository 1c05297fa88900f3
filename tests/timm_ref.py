"""timm's Lamb and Lars as test-only references, loaded without importing timm itself.

``import timm`` runs ``timm/__init__.py``, which imports timm.layers and through it
torchvision; installing that (and the CUDA torch it pins) is several GB for two
optimizers that only need torch. timm's ``optim/lamb.py`` and ``optim/lars.py`` import
nothing but torch and their siblings ``optim/_helpers.py`` / ``optim/_types.py`` (relative
imports), so they are loaded here as submodules of a private package whose ``__path__``
is the installed ``timm/optim`` directory. Nothing named ``timm`` is put in
``sys.modules``, so a real ``import timm`` elsewhere behaves as it would without this.

``scripts/setup_env.sh`` installs timm with ``pip install --no-deps timm``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Any

_PACKAGE = "_lbllm_timm_optim"  # private name for timm/optim loaded as a bare package


def timm_optim_dir() -> str | None:
    """The installed ``timm/optim`` directory, found without executing ``timm/__init__``."""
    # find_spec on a top-level name only locates the package; it does not import it.
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, "optim")
        if os.path.isfile(os.path.join(path, "lamb.py")) and os.path.isfile(os.path.join(path, "lars.py")):
            return path
    return None


def timm_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("timm")
    except Exception:
        return None


def load_timm_optimizers() -> dict[str, Any]:
    """``{"Lamb": timm.optim.lamb.Lamb, "Lars": timm.optim.lars.Lars}``.

    Raises ImportError (with what to run) if timm is not installed.
    """
    path = timm_optim_dir()
    if path is None:
        raise ImportError("timm is not installed; it is a test-only reference: "
                          ".venv/bin/python -m pip install --no-deps timm")
    pkg = sys.modules.get(_PACKAGE)
    if pkg is None:
        pkg = types.ModuleType(_PACKAGE)
        pkg.__path__ = [path]  # a package whose submodules are timm/optim/*.py
        pkg.__package__ = _PACKAGE
        sys.modules[_PACKAGE] = pkg
    lamb = importlib.import_module(f"{_PACKAGE}.lamb")
    lars = importlib.import_module(f"{_PACKAGE}.lars")
    return {"Lamb": lamb.Lamb, "Lars": lars.Lars}
