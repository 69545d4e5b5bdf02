"""Progress bars on a terminal, silence elsewhere (CI logs, pipes)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", **kw):
    # disable=None: tqdm shows the bar only when stderr is a terminal.
    disable = None if not os.environ.get("LMSTACK_NO_PROGRESS") else True
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=False, **kw)
