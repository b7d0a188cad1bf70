"""The Policy interface.

A policy drives one request: an async function of its session, with no global
state, so hundreds of requests run concurrently on one event loop and the
backends batch their calls. It reaches models only through the session (which
meters every call and records every decision in the trace).
"""

from __future__ import annotations

import asyncio
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


def discard(call: asyncio.Future) -> None:
    """Drop a model call nobody will read (a draft made ahead); one that already failed (no room left in the
    context) has its exception read, so that asyncio does not log it as never retrieved."""
    if not call.cancel() and not call.cancelled():
        call.exception()


def engines_apart(session: Session, *roles: str) -> bool:
    """Whether these roles' engines can work at the same time: no two of them run in one process.

    Two engines in one process take turns on its GIL, so overlapping their calls
    (a draft made while another model verifies or judges) only slows each down:
    measured on the arith pair in-process (hf, one core each), a verification beside
    a draft took twice as long and both pipelines lost 8-25%; in processes of their own
    (``models.<role>.process``, Ray actors, vLLM's engine core) both cores work at once.
    """
    hosts = [session.models[r].process for r in roles]
    known = [h for h in hosts if h is not None]
    return len(set(known)) == len(known)
