"""reasonspec's public API: the Orchestrator, its configuration and results.

The names are imported on first use (PEP 562), so that importing a light submodule such
as ``orchestrator.answer`` (what every grading process runs) does not load torch,
transformers and the policies.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.config import ConfigError, RunConfig, load_config
    from orchestrator.core import Orchestrator
    from orchestrator.session import Event, Metrics, Result, Segment

_WHERE = {
    "ConfigError": "orchestrator.config", "RunConfig": "orchestrator.config", "load_config": "orchestrator.config",
    "Orchestrator": "orchestrator.core",
    "Event": "orchestrator.session", "Metrics": "orchestrator.session", "Result": "orchestrator.session",
    "Segment": "orchestrator.session",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
