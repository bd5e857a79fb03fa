"""PEP 562 lazy exports for a package's __init__: a public name imports its defining submodule on first use."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]) -> tuple[Callable[[str], Any],
                                                                             Callable[[], list[str]]]:
    """(__getattr__, __dir__) for the package whose globals() is `namespace`; exports: public name -> the submodule
    defining it. A name resolved once is cached in the namespace (later lookups skip __getattr__)."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted([*namespace, *exports])

    return __getattr__, __dir__
