"""Reasoning-level policies and their configuration union."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Field

from policies.base import Policy, PolicyParams
from policies.baselines import LargeOnly, LargeOnlyParams, SmallOnly, SmallOnlyParams

POLICIES: dict[str, tuple[type[PolicyParams], type[Policy]]] = {
    "large-only": (LargeOnlyParams, LargeOnly),
    "small-only": (SmallOnlyParams, SmallOnly),
}

PolicyConfig = Annotated[Union[LargeOnlyParams, SmallOnlyParams], Field(discriminator="type")]


def build_policy(params: PolicyParams) -> Policy:
    return POLICIES[params.type][1](params)


__all__ = ["POLICIES", "Policy", "PolicyConfig", "PolicyParams", "build_policy", "LargeOnly", "SmallOnly"]
