"""Baselines every result is compared with: one model writes everything."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from policies.base import Policy, PolicyParams

if TYPE_CHECKING:
    from orchestrator.session import Session


class SingleModelParams(PolicyParams):
    pass


class LargeOnlyParams(SingleModelParams):
    type: Literal["large-only"] = "large-only"


class SmallOnlyParams(SingleModelParams):
    type: Literal["small-only"] = "small-only"


class _SingleModel(Policy):
    role: str

    async def run(self, session: Session) -> None:
        g = await session.generate(self.role)
        session.accept(self.role, g, kind="burst")
        session.finish(g.finish_reason)  # EOS already ended it; else "length" or "stop"


class LargeOnly(_SingleModel):
    name = "large-only"
    roles = ("large",)
    role = "large"


class SmallOnly(_SingleModel):
    name = "small-only"
    roles = ("small",)
    role = "small"
