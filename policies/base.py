"""The Policy interface.

A policy drives one request: an async function of its session, with no global
state, so hundreds of requests run concurrently on one event loop and the
backends batch their calls. It reaches models only through the session (which
meters every call and records every decision in the trace).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # the concrete session lives in the orchestrator (dependencies point one way)
    from orchestrator.session import ModelHandle, Session


class PolicyParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Policy:
    """Base class: subclasses set ``name``, ``roles`` and implement ``run``."""

    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...]] = ("large",)
    shared_vocab: ClassVar[bool] = False

    def __init__(self, params: PolicyParams):
        self.params = params

    def check(self, models: dict[str, ModelHandle]) -> None:
        """Fail at start-up, with a clear message, if the models cannot run this policy."""
        missing = [r for r in self.roles if r not in models]
        if missing:
            raise ValueError(f"policy {self.name} needs model role(s) {missing} in the config's `models`")
        if self.shared_vocab:
            prints = {r: models[r].vocab_fingerprint for r in self.roles}
            if len(set(prints.values())) > 1:
                raise ValueError(
                    f"policy {self.name} works token by token and needs one shared vocabulary, but the models' "
                    f"vocabularies differ ({prints}); use a step-level policy (specreason, spec-thinking) instead"
                )

    async def run(self, session: Session) -> None:
        raise NotImplementedError
