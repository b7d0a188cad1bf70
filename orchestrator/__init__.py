"""reasonspec's public API: the Orchestrator, its configuration and results."""

from orchestrator.config import ConfigError, RunConfig, load_config
from orchestrator.core import Orchestrator
from orchestrator.session import Event, Metrics, Result, Segment

__all__ = ["ConfigError", "Event", "Metrics", "Orchestrator", "Result", "RunConfig", "Segment", "load_config"]
