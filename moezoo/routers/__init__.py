"""Routing algorithms and auxiliary losses. Every router maps ``x: (tokens, dim)`` to a :class:`Routing`."""

from moezoo.routers import functional, losses
from moezoo.routers.balanced import BalancedAssignmentRouter
from moezoo.routers.base import Router, set_routing
from moezoo.routers.batch_prioritized import VMOE_LOSS_WEIGHTS, BatchPrioritizedRouter, bpr_router_factory
from moezoo.routers.dense_training import DenseTrainingRouter
from moezoo.routers.dselect_k import DSelectKRouter
from moezoo.routers.expert_choice import ExpertChoiceRouter
from moezoo.routers.forced_balance import ForcedBalanceRouter
from moezoo.routers.group_limited import GroupLimitedRouter
from moezoo.routers.hash import HashRouter
from moezoo.routers.moa import MoARouter
from moezoo.routers.routing import Routing
from moezoo.routers.sigma_moe import SigmaMoERouter
from moezoo.routers.sigmoid import SigmoidRouter
from moezoo.routers.sinkhorn import SinkhornRouter
from moezoo.routers.sparse_mixer import SparseMixerRouter
from moezoo.routers.speech_moe import SpeechMoERouter
from moezoo.routers.switchhead import SwitchHeadSelector
from moezoo.routers.top_k import TopKRouter

__all__ = [
    "BalancedAssignmentRouter",
    "BatchPrioritizedRouter",
    "DSelectKRouter",
    "DenseTrainingRouter",
    "ExpertChoiceRouter",
    "ForcedBalanceRouter",
    "GroupLimitedRouter",
    "HashRouter",
    "MoARouter",
    "Router",
    "Routing",
    "SigmaMoERouter",
    "SigmoidRouter",
    "SinkhornRouter",
    "SparseMixerRouter",
    "SpeechMoERouter",
    "SwitchHeadSelector",
    "TopKRouter",
    "VMOE_LOSS_WEIGHTS",
    "bpr_router_factory",
    "functional",
    "losses",
    "set_routing",
]
