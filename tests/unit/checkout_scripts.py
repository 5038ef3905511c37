"""Loads a script of the checkout's scripts/ folder as a module, for the tests of its pure half
(the scripts are tools of the checkout, not modules of an installed package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as the module `lbnat_<name>` (registered in sys.modules first, since
    dataclasses look their module up while it loads)."""
    spec = importlib.util.spec_from_file_location(f"lbnat_{name}", SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
