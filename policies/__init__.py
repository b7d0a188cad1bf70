"""Reasoning-level policies and their configuration union."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from policies.base import Policy, PolicyParams
from policies.baselines import LargeOnly, LargeOnlyParams, SmallOnly, SmallOnlyParams
from policies.bild import BiLD, BiLDParams
from policies.consultant import ConsultantDecoding, ConsultantParams
from policies.easd import EASDParams, EntropyAwareSD
from policies.hierarchical import HierarchicalParams, HierarchicalSD
from policies.multi_candidate import MultiCandidateParams, MultiCandidateSD
from policies.pyramid import PyramidParams, PyramidSD
from policies.reflective import ReflectiveParams, ReflectiveVerification
from policies.spec_thinking import SpecThinkingParams, SpeculativeThinking
from policies.specreason import SpecReason, SpecReasonParams
from policies.spec_verification import SpeculativeVerification, SpecVerificationParams
from policies.speculative import SpeculativeDecoding, SpeculativeParams

POLICIES: dict[str, type[Policy]] = {
    "large-only": LargeOnly,
    "small-only": SmallOnly,
    "specreason": SpecReason,
    "spec-thinking": SpeculativeThinking,
    "consultant": ConsultantDecoding,
    "speculative": SpeculativeDecoding,
    "bild": BiLD,
    "easd": EntropyAwareSD,
    "spec-verification": SpeculativeVerification,
    "reflective": ReflectiveVerification,
    "hierarchical": HierarchicalSD,
    "multi-candidate": MultiCandidateSD,
    "pyramid": PyramidSD,
}

PolicyConfig = Annotated[
    Union[LargeOnlyParams, SmallOnlyParams, SpecReasonParams, SpecThinkingParams, ConsultantParams, SpeculativeParams,
          BiLDParams, EASDParams, SpecVerificationParams, ReflectiveParams, HierarchicalParams, MultiCandidateParams,
          PyramidParams],
    Field(discriminator="type"),
]


def build_policy(params: PolicyParams) -> Policy:
    return POLICIES[params.type](params)


__all__ = [
    "POLICIES", "Policy", "PolicyConfig", "PolicyParams", "build_policy", "LargeOnly", "SmallOnly", "SpecReason",
    "SpeculativeThinking", "ConsultantDecoding", "SpeculativeDecoding", "BiLD", "EntropyAwareSD",
    "SpeculativeVerification", "ReflectiveVerification", "HierarchicalSD", "MultiCandidateSD", "PyramidSD",
]
