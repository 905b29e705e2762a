"""Routing algorithms and auxiliary losses. Every router maps ``x: (tokens, dim)`` to a :class:`Routing`."""

from moezoo.routers import functional, losses
from moezoo.routers.balanced import BalancedAssignmentRouter
from moezoo.routers.base import Router
from moezoo.routers.batch_prioritized import BatchPrioritizedRouter
from moezoo.routers.expert_choice import ExpertChoiceRouter
from moezoo.routers.hash import HashRouter
from moezoo.routers.routing import Routing
from moezoo.routers.sigmoid import SigmoidRouter
from moezoo.routers.sinkhorn import SinkhornRouter
from moezoo.routers.top_k import TopKRouter

__all__ = [
    "BalancedAssignmentRouter",
    "BatchPrioritizedRouter",
    "ExpertChoiceRouter",
    "HashRouter",
    "Router",
    "Routing",
    "SigmoidRouter",
    "SinkhornRouter",
    "TopKRouter",
    "functional",
    "losses",
]
