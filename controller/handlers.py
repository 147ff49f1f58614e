"""Device handlers: resolve a device config's ``handler: module:function`` references.

:mod:`statemachines` keeps only the reference (:class:`~statemachines.device.HandlerRef`);
importing the module (running device code) happens here, when a device is served, never when a
config is loaded or checked.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from statemachines.device import CommandSpec, DeviceSpec, HandlerRef
from statemachines.source import ConfigError, ConfigErrors

Handler = Callable[..., Any]

#: handler file -> (its mtime when loaded, the module): each file version is executed once
_file_modules: dict[Path, tuple[int, ModuleType]] = {}
_file_lock = threading.RLock()


def resolve_handlers(spec: DeviceSpec) -> dict[str, Handler]:
    """The handler function of every command of ``spec`` that has one, by command name.

    Imports each handler module (a file next to the config first, see :func:`resolve_handler`)
    and checks that the function can be called with ``ctx`` and the command's params. Raises
    :class:`statemachines.source.ConfigErrors` (``file:line: message``, every problem, in line
    order) for a module that cannot be imported, a missing function, or a function whose
    signature does not fit.
    """
    handlers: dict[str, Handler] = {}
    errors: list[ConfigError] = []
    for name, cmd in spec.commands.items():
        ref = cmd.handler_ref
        if ref is None:
            continue
        try:
            handlers[name] = _checked(cmd, ref)
        except LookupError as exc:
            errors.append(ConfigError(spec.path, ref.line or 1, f"command '{name}': {exc}"))
    if errors:
        errors.sort(key=lambda e: e.line)
        raise ConfigErrors(errors)
    return handlers


def _checked(cmd: CommandSpec, ref: HandlerRef) -> Handler:
    """The function ``ref`` names, if it can be called as ``f(ctx, **params)`` both with every
    param given and with only those always present (required or defaulted)."""
    try:
        func = resolve_handler(str(ref), ref.base_dir)
    except LookupError as exc:
        raise LookupError(f"handler {str(ref)!r}: {exc}") from None
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return func
    params = cmd.params
    always = [n for n, p in params.items() if p.required or p.has_default]
    for names in (list(params), always):
        try:
            signature.bind(None, **dict.fromkeys(names))
        except TypeError as exc:
            shown = ", ".join(["ctx", *names])
            raise LookupError(
                f"handler {str(ref)!r} cannot be called as {func.__name__}({shown}): {exc}"
            ) from None
    return func


def resolve_handler(ref: str, base_dir: Path | None = None) -> Handler:
    """Return the function named by ``module:function``.

    The module is ``<base_dir>/<module path>.py`` if that file exists (loaded under a unique
    name; ``sys.path`` is not touched), else ``importlib.import_module(module)``. Raises
    LookupError with a readable reason.
    """
    module_name, _, func_name = ref.partition(":")
    module: ModuleType | None = None
    candidate = None
    if base_dir is not None:
        candidate = (base_dir / (module_name.replace(".", "/") + ".py")).resolve()
        if candidate.is_file():
            module = _load_file_module(candidate)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or module_name
            if module_name == missing or module_name.startswith(missing + "."):
                looked = f"{candidate} and " if candidate is not None else ""
                raise LookupError(
                    f"no module {module_name!r} (looked for {looked}an importable module)"
                )
            raise LookupError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
        except Exception as exc:
            raise LookupError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}")
    func = getattr(module, func_name, None)
    if func is None:
        functions = sorted(
            n for n, v in vars(module).items()
            if inspect.isfunction(v) and not n.startswith("_") and v.__module__ == module.__name__
        )  # fmt: skip
        raise LookupError(
            f"module {module_name!r} has no function {func_name!r} "
            f"(functions: {', '.join(functions) or 'none'})"
        )
    if not callable(func):
        raise LookupError(f"{module_name}.{func_name} is not a function")
    return func


def _load_file_module(path: Path) -> ModuleType:
    """Load (once per file version) a handler file under a unique module name."""
    with _file_lock:  # two servers starting at once must not run a module twice
        mtime = path.stat().st_mtime_ns
        cached = _file_modules.get(path)
        if cached is not None and cached[0] == mtime:
            return cached[1]
        digest = hashlib.sha1(str(path).encode(), usedforsecurity=False).hexdigest()[:12]
        name = f"_statelink_handlers_{path.stem}_{digest}_{mtime}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise LookupError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise LookupError(f"importing {path} failed: {type(exc).__name__}: {exc}")
        if cached is not None:
            sys.modules.pop(cached[1].__name__, None)
        _file_modules[path] = (mtime, module)
        return module
