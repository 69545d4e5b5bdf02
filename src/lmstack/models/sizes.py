"""Named sizes for a family's config dataclass, plus `d<N>` for its one size dial `sized(N)`."""

from __future__ import annotations

from typing import ClassVar

from lmstack.errors import InputError


class Presets:
    """Mixin for a config dataclass that defines `sized(dial)` and a `PRESETS` dict."""

    FAMILY: ClassVar[str]
    PRESETS: ClassVar[dict[str, dict]]

    @classmethod
    def preset(cls, name: str, **overrides):
        if name.startswith("d") and name[1:].isdigit():
            return cls.sized(int(name[1:]), **overrides)
        if name not in cls.PRESETS:
            raise InputError(f"unknown {cls.FAMILY} preset {name!r}; known: {sorted(cls.PRESETS)} or d<N> for sized(N)")
        return cls(**{**cls.PRESETS[name], **overrides})
