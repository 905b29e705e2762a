"""SpeechMoE's router and its two auxiliary losses (You et al. 2021, arXiv 2105.03036; SpeechMoE2, 2111.11831).

The router of MoE layer l scores experts from the concatenation of the shared embedding network's
frame output e (SpeechMoE's "local grapheme embedding"), optionally SpeechMoE2's utterance-level
domain/accent embeddings g, and the layer input x: ``p = softmax(W [e; g; x])``; each frame goes to
its top-1 expert, whose output is scaled by that probability. The layer gets this input through
``MoE.forward(x, router_input=SpeechMoERouter.router_input(x, e, g))``.

The losses (in :mod:`moezoo.routers.losses`) are those of the paper's abstract names as implemented by the authors' later
public code (tencent-ailab/3m-asr ``trainer/loss/balance_loss.py``) and, independently, by
Microsoft's MoE loss collection; both agree:

- sparsity L1 loss ``L_s = (1/m) sum_i || p_i / ||p_i||_2 ||_1`` over the m routed frames: 1 when every
  frame's distribution is one-hot, sqrt(n) when uniform over n experts;
- mean importance loss ``L_m = n sum_j Imp_j^2`` with ``Imp = (1/m) sum_i p_i``: 1 when the experts'
  mean probabilities are equal, n when one expert takes everything.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moezoo.checks import require_float, require_int
from moezoo.routers import functional as RF
from moezoo.routers.base import Router
from moezoo.routers.losses import mean_importance_loss, sparsity_l1_loss
from moezoo.routers.routing import Routing

__all__ = ["SPEECHMOE_LOSS_WEIGHTS", "SpeechMoERouter"]

#: alpha (sparsity L1) and beta (mean importance), summed over MoE layers as the authors' code.
#: The SpeechMoE / SpeechMoE2 papers' values (arXiv 2105.03036, 2111.11831) were NOT FOUND: the stored
#: copies searched gave their abstracts and introductions only. 0.1 each is the default of the
#: authors' later 3M-ASR code (tencent-ailab/3m-asr, ``aux_scale = [0.1] * 2``); its shipped
#: WenetSpeech MoE recipe (``examples/wenetspeech/conf/moe_config.yaml``) sets ``aux_scale:
#: [0.15, 0.15]`` with ``embed_scale: 0.01`` for a Conformer CTC/AED model, not SpeechMoE's CTC one,
#: so moezoo keeps the code default.
SPEECHMOE_LOSS_WEIGHTS = {"sparsity_l1": 0.1, "mean_importance": 0.1}


class SpeechMoERouter(Router):
    """SpeechMoE's router: a bias-free linear gate on ``[embedding; global embeddings; layer input]``.

    ``forward(router_input: (frames, embed_dim + global_dim + dim)) -> Routing``: softmax over experts,
    the top-k (paper: k=1) experts per frame weighted by their probabilities (no renormalisation,
    no capacity), losses ``sparsity_l1`` and ``mean_importance`` (unweighted; see
    :data:`SPEECHMOE_LOSS_WEIGHTS`).

    Args:
        dim: size of the MoE layer's input x.
        num_experts: n.
        embed_dim: size of the shared embedding network's output e.
        global_dim: total size of SpeechMoE2's global (domain, accent) embeddings; 0 for SpeechMoE.
        k: experts per frame.
        init_gain: Xavier-uniform gain of the gate (the authors' 3M-ASR config: random init, gain
            0.5); 0 starts from a zero gate (every expert equally likely, the code's default).
        check_finite: see :class:`~moezoo.routers.Router`.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        embed_dim: int,
        global_dim: int = 0,
        k: int = 1,
        init_gain: float = 0.5,
        check_finite: bool = True,
    ) -> None:
        name = type(self).__name__
        layer_dim = require_int(name, "dim", dim)
        self.embed_dim = require_int(name, "embed_dim", embed_dim)
        self.global_dim = require_int(name, "global_dim", global_dim, low=0)
        super().__init__(self.embed_dim + self.global_dim + layer_dim, num_experts, k, check_finite=check_finite)
        self.layer_dim = layer_dim
        require_float(name, "init_gain", init_gain)
        # The gate maps (dim_in -> experts); Xavier's fan-in/fan-out are symmetric, so the layout of
        # nn.Linear's weight (experts, dim_in) gives the same bound as the reference's (dim_in, experts).
        if init_gain > 0:
            nn.init.xavier_uniform_(self.gate.weight, gain=init_gain)
        else:
            nn.init.zeros_(self.gate.weight)

    def extra_repr(self) -> str:
        return (f"dim={self.layer_dim}, embed_dim={self.embed_dim}, global_dim={self.global_dim}, "
                f"num_experts={self.num_experts}, k={self.k}")

    @staticmethod
    def router_input(x: Tensor, embedding: Tensor, global_embedding: Tensor | None = None) -> Tensor:
        """``[embedding; global_embedding; x]`` along the last dim, the order the gate expects.

        Args:
            x: (..., dim) the MoE layer's input.
            embedding: (..., embed_dim) the shared embedding network's output at the same frames.
            global_embedding: (..., global_dim) utterance-level embeddings broadcast to the frames, or None.
        """
        parts = [embedding.to(x.dtype)]
        if global_embedding is not None:
            parts.append(global_embedding.to(x.dtype))
        parts.append(x)
        return torch.cat(parts, dim=-1)

    def route(self, x: Tensor, *, token_ids: Tensor | None, positions: Tensor | None,
              capacity_groups: list[int] | None) -> Routing:
        """Route frames; ``x`` is the router input (frames, embed_dim + global_dim + dim)."""
        logits = self.compute_logits(x)
        probs = torch.softmax(logits, dim=-1)
        token, expert, weight = RF.top_k_assign(probs, self.k)
        losses = {"sparsity_l1": sparsity_l1_loss(probs), "mean_importance": mean_importance_loss(probs)}
        return self.finish(token, expert, weight, logits.shape[0], logits=logits, probs=probs,
                           losses=losses)
