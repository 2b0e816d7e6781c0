"""Where data files live: `SYNTHGATE_DATA_DIR`, else `../shared/data` when present, else a user cache dir."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SYNTHGATE_DATA_DIR"


def data_dir() -> Path:
    """The directory synthgate reads named datasets from (and downloads into)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    # The development checkout sits beside a `shared/data` folder; prefer it when it exists.
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        shared = base.parent / "shared" / "data"
        if shared.is_dir():
            return shared
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("synthgate")) / "data"
