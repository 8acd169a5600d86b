"""The public API is documented and annotated (#9 item 4).

For every function and class that ``fisher_ref`` and ``fisher_fast`` export (``__all__``), and
the public methods of those classes (``__init__`` and ``__call__`` included, inherited ones
from the package's own base classes too): a docstring (not required of ``__init__`` and
``__call__``, documented by the class), every parameter annotated except ``self``/``cls`` and
``*args``/``**kwargs``, the return annotated, and the annotations resolvable
(``typing.get_type_hints``), so that a stale name fails here rather than in a type checker.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
import typing

import fisher_fast
import fisher_ref

_DUNDERS = ("__init__", "__call__")  # public protocol, documented by the class docstring


def _unwrap(attr):
    """The function behind a class attribute, or None when it is not a method or property."""
    if isinstance(attr, (classmethod, staticmethod)):
        return attr.__func__
    if isinstance(attr, property):
        return attr.fget
    if isinstance(attr, functools.cached_property):
        return attr.func
    return attr if inspect.isfunction(attr) else None


def _methods(cls, prefix: str):
    """``(name, function)`` of the public methods of ``cls``, from ``cls`` and those of its bases
    that the package itself defines (not ``dict``'s or ``object``'s), the nearest definition
    first.
    """
    seen = set()
    for base in cls.__mro__:
        if not base.__module__.startswith(prefix):
            continue
        for name, attr in vars(base).items():
            if name in seen or (name.startswith("_") and name not in _DUNDERS):
                continue
            seen.add(name)
            fn = _unwrap(attr)
            if fn is not None:
                yield name, fn


def _function_problems(where: str, fn, *, needs_doc: bool) -> list[str]:
    out = []
    if needs_doc and not (fn.__doc__ or "").strip():
        out.append(f"{where}: no docstring")
    sig = inspect.signature(fn)
    for i, p in enumerate(sig.parameters.values()):
        if i == 0 and p.name in ("self", "cls"):
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.annotation is p.empty:
            out.append(f"{where}: parameter {p.name!r} not annotated")
    if sig.return_annotation is sig.empty:
        out.append(f"{where}: return not annotated")
    try:
        typing.get_type_hints(fn)
    except Exception as e:  # an annotation naming something that does not exist
        out.append(f"{where}: annotations do not resolve ({type(e).__name__}: {e})")
    return out


def problems(objects: dict, prefix: str) -> list[str]:
    """Every missing docstring or annotation among ``objects`` (name -> object); classes bring
    their public methods. ``prefix``: the module prefix of the package's own classes.
    """
    out = []
    for name, obj in objects.items():
        if inspect.isfunction(obj):
            out += _function_problems(name, obj, needs_doc=True)
        elif inspect.isclass(obj):
            if not (obj.__doc__ or "").strip():
                out.append(f"{name}: no docstring")
            for method, fn in _methods(obj, prefix):
                out += _function_problems(f"{name}.{method}", fn, needs_doc=method not in _DUNDERS)
    return out


def _exported(package) -> dict:
    return {name: getattr(package, name) for name in package.__all__}


def _report(found: list[str]) -> str:
    return f"{len(found)} problems:\n  " + "\n  ".join(found)


def test_fisher_ref_exports_are_documented_and_annotated():
    found = problems(_exported(fisher_ref), "fisher_ref")
    assert not found, _report(found)


def test_every_public_function_of_the_oracle_core_modules_is_documented_and_annotated():
    # beyond __all__: the building blocks (fisher_ref.units.prepare, slicing.slice_masks, ...);
    # fisher_ref.conformance and fisher_ref.testing (subpackages) and _private modules aside
    objects = {}
    for info in pkgutil.iter_modules(fisher_ref.__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"fisher_ref.{info.name}")
        objects.update({f"{module.__name__}.{n}": obj for n, obj in vars(module).items()
                        if not n.startswith("_") and getattr(obj, "__module__", None) == module.__name__})
    assert len(objects) > len(fisher_ref.__all__) // 2  # the walk found the modules' contents
    found = problems(objects, "fisher_ref")
    assert not found, _report(found)


def test_fisher_fast_exports_are_documented_and_annotated():
    found = problems(_exported(fisher_fast), "fisher_fast")
    assert not found, _report(found)


# ---------------------------------------------------------------- the checker finds problems


def good(x: int, *args: int, flag: bool = False, **kwargs: str) -> int:
    """Documented and annotated (``*args`` and ``**kwargs`` are exempt, yet annotated here)."""
    return x


def bare_args(x, *args, **kwargs) -> None:
    """Documented; ``x`` is not annotated (``*args``/``**kwargs`` need not be)."""


def undocumented(x: int) -> int:
    return x


def stale(x: int) -> None:
    """Documented; the annotation of ``x`` (below) names nothing."""


stale.__annotations__["x"] = "NoSuchName"  # as a renamed type would leave it


class _Base:
    def inherited(self, y):
        """A public method of a private base: it counts for the public subclass."""


class Widget(_Base):
    """A class."""

    def __init__(self, size) -> None:
        self.size = size

    def __call__(self, z: float) -> float:
        return z

    def grow(self, by: int):
        """Returns nothing annotated."""

    @property
    def area(self) -> int:
        return self.size ** 2

    @classmethod
    def make(cls, n: int) -> Widget:
        """A classmethod: ``cls`` is exempt."""
        return cls(n)

    def _private(self, q):
        pass


class Plain(dict):
    """A dict subclass: dict's own methods are not the package's."""


def test_the_checker_reports_each_kind_of_problem_and_nothing_else():
    objects = {"good": good, "bare_args": bare_args, "undocumented": undocumented, "stale": stale,
               "Widget": Widget, "Plain": Plain, "an_instance": Plain(), "a_number": 3}
    found = problems(objects, __name__)
    assert sorted(found) == sorted([
        "bare_args: parameter 'x' not annotated",
        "undocumented: no docstring",
        "stale: annotations do not resolve (NameError: name 'NoSuchName' is not defined)",
        "Widget.__init__: parameter 'size' not annotated",
        "Widget.grow: return not annotated",
        "Widget.area: no docstring",
        "Widget.inherited: parameter 'y' not annotated",
        "Widget.inherited: return not annotated",
    ]), found
