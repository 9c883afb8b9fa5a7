"""Shared pieces for config dataclasses: strict validation and constrained number types.

Every stage's config is a plain dataclass; pydantic validates it when a recipe loads,
and `extra="forbid"` turns a misspelt key into an error instead of a silent default.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import ConfigDict, Field

STRICT = ConfigDict(extra="forbid", validate_assignment=True)

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
