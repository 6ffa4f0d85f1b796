"""Simulates the bare GPU image on any machine: put this folder on PYTHONPATH and name packages in
LADDER_TEST_HIDE_PACKAGES (comma-separated); they then look absent, as on an image that never had them: import
raises ModuleNotFoundError, importlib.util.find_spec returns None, importlib.metadata finds no distribution.
Used by tests/install/test_bare_image.py."""

import importlib.abc
import importlib.metadata
import importlib.util
import os
import sys

HIDDEN = frozenset(filter(None, os.environ.get("LADDER_TEST_HIDE_PACKAGES", "").split(",")))
# distribution names that differ from the import names
DISTRIBUTIONS = {name.replace("_", "-") for name in HIDDEN} | HIDDEN


def _hidden(name: str) -> bool:
    return name.split(".")[0] in HIDDEN


class _Hider(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: bare-image simulation)", name=name)
        return None


_find_spec = importlib.util.find_spec


def find_spec(name, package=None):
    absolute = importlib.util.resolve_name(name, package) if name.startswith(".") else name
    return None if _hidden(absolute) else _find_spec(name, package)


_from_name = importlib.metadata.Distribution.from_name.__func__
_distributions = importlib.metadata.distributions


def _dist_from_name(cls, name):
    if name.lower().replace("_", "-") in DISTRIBUTIONS or name in HIDDEN:
        raise importlib.metadata.PackageNotFoundError(name)
    return _from_name(cls, name)


def distributions(**kwargs):
    return (d for d in _distributions(**kwargs) if (d.metadata["Name"] or "").lower() not in DISTRIBUTIONS)


if HIDDEN:
    sys.meta_path.insert(0, _Hider())
    importlib.util.find_spec = find_spec
    importlib.metadata.Distribution.from_name = classmethod(_dist_from_name)
    importlib.metadata.distributions = distributions
