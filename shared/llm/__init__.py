"""One way for every server to reach an LLM: routing, fallbacks, budgets, caches and a cost ledger.

    from hydrabrain.shared.llm import llm_from_settings, Completion, LLMError
    llm = llm_from_settings(settings)   # None in plain mode: no provider configured
"""

from hydrabrain.shared.llm.ledger import Ledger
from hydrabrain.shared.llm.policy import TASKS, Deployment, RouteDecision
from hydrabrain.shared.llm.providers import ProviderError
from hydrabrain.shared.llm.routing import (
    LLM,
    Completion,
    LLMError,
    StreamEvent,
    llm_from_settings,
    provider_configs,
    providers_from_environment,
)

__all__ = [
    "LLM",
    "TASKS",
    "Completion",
    "Deployment",
    "LLMError",
    "Ledger",
    "ProviderError",
    "RouteDecision",
    "StreamEvent",
    "llm_from_settings",
    "provider_configs",
    "providers_from_environment",
]
