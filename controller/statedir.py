"""Where the controller keeps state that must survive a restart (idempotency keys, run journals).

:func:`default_state_dir` is systemd's ``$STATE_DIRECTORY`` (set by ``StateDirectory=`` in a
unit; when it lists several paths, colon-separated, the first one), else
``~/.local/state/statelink``. :func:`ensure_private_dir` creates such a directory readable by
its owner only (0700); an existing directory keeps its mode (systemd chose it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The state directory to use when none is given (``environ``: ``os.environ`` by default)."""
    env = os.environ if environ is None else environ
    first = env.get("STATE_DIRECTORY", "").split(":")[0]
    if first:
        return Path(first)
    return Path.home() / ".local" / "state" / "statelink"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) with mode 0700 if it does not exist; return it."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask; the last component must be private regardless
        path.chmod(0o700)
    return path
