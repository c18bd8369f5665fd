"""The base of every frozen output."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Record(BaseModel):
    """Base for outputs: frozen; JSON round-trips through ``model_dump``/``model_validate``."""

    model_config = ConfigDict(frozen=True, extra="forbid")
