"""Shared pieces for config dataclasses: strict validation and constrained number types.

Every stage's config is a plain dataclass; pydantic validates it when a recipe loads,
and `extra="forbid"` turns a misspelt key into an error instead of a silent default.
The number types refuse `true`/`false`: pydantic would read them as 1 and 0, so a slip
such as `epochs: true` would train for one epoch without a word.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, ConfigDict, Field

STRICT = ConfigDict(extra="forbid", validate_assignment=True)


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


NotBool = BeforeValidator(_no_bool)
Int = Annotated[int, NotBool]
Float = Annotated[float, NotBool]
PosInt = Annotated[int, NotBool, Field(gt=0)]
NonNegInt = Annotated[int, NotBool, Field(ge=0)]
PosFloat = Annotated[float, NotBool, Field(gt=0)]
NonNegFloat = Annotated[float, NotBool, Field(ge=0)]
Fraction = Annotated[float, NotBool, Field(ge=0, le=1)]
