"""Config-driven modules: a small base that turns dataclass configs to and from JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from typing_extensions import Self


@dataclasses.dataclass(frozen=True)
class ModuleConfig:
    """Base for the modules' configs; saved in checkpoint metadata, so unknown keys are an error."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown keys {sorted(unknown)}; known: {sorted(names)}"
            )
        # JSON turns tuples into lists; keep the dataclass hashable and comparable.
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fixed)
