"""Every public name of the package has a docstring (functions, classes, their public methods and properties)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import dbsp


def _public_modules() -> list[str]:
    names = ["dbsp"]
    for info in pkgutil.walk_packages(dbsp.__path__, prefix="dbsp."):
        parts = info.name.split(".")
        if any(p.startswith("_") for p in parts):
            continue
        names.append(info.name)
    return names


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    exported = getattr(module, "__all__", None)
    names = exported or [n for n in vars(module) if not n.startswith("_")]
    for name in names:
        obj = getattr(module, name)
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or not obj.__module__.startswith("dbsp"):
            continue  # constants, and what the module imports from elsewhere
        if obj.__module__ != module_name and exported is None:
            continue  # checked where it is defined
        doc = (obj.__doc__ or "").strip()
        if not doc or (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}(")):  # dataclasses write their signature
            missing.append(f"{module_name}.{name}")
        if inspect.isclass(obj):
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                fn = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
                if (inspect.isfunction(fn) or isinstance(value, property)) and not (fn.__doc__ or "").strip():
                    missing.append(f"{module_name}.{name}.{attr}")
    return missing


@pytest.mark.parametrize("module_name", _public_modules())
def test_public_names_have_docstrings(module_name):
    assert _undocumented(module_name) == []


def test_the_walk_sees_the_main_modules():
    found = set(_public_modules())
    assert {"dbsp", "dbsp.dist", "dbsp.plan", "dbsp.predict", "dbsp.video", "dbsp.integrations.diffusers"} <= found
