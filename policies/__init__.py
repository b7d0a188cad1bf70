"""Reasoning-level policies and their configuration union."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from policies.base import Policy, PolicyParams
from policies.baselines import LargeOnly, LargeOnlyParams, SmallOnly, SmallOnlyParams
from policies.consultant import ConsultantDecoding, ConsultantParams
from policies.spec_thinking import SpecThinkingParams, SpeculativeThinking
from policies.specreason import SpecReason, SpecReasonParams
from policies.speculative import SpeculativeDecoding, SpeculativeParams

POLICIES: dict[str, type[Policy]] = {
    "large-only": LargeOnly,
    "small-only": SmallOnly,
    "specreason": SpecReason,
    "spec-thinking": SpeculativeThinking,
    "consultant": ConsultantDecoding,
    "speculative": SpeculativeDecoding,
}

PolicyConfig = Annotated[
    Union[LargeOnlyParams, SmallOnlyParams, SpecReasonParams, SpecThinkingParams, ConsultantParams, SpeculativeParams],
    Field(discriminator="type"),
]


def build_policy(params: PolicyParams) -> Policy:
    return POLICIES[params.type](params)


__all__ = [
    "POLICIES", "Policy", "PolicyConfig", "PolicyParams", "build_policy", "LargeOnly", "SmallOnly", "SpecReason",
    "SpeculativeThinking", "ConsultantDecoding", "SpeculativeDecoding",
]
