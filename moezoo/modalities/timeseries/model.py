"""Time-MoE (Shi et al. 2024, arXiv 2409.16040): a decoder-only MoE forecaster with point-wise tokens.

Built from moezoo's parts (``moezoo.layers.MoE`` with a ``TopKRouter`` and the sigmoid-gated
shared expert) and numerically faithful to the reference (github Time-MoE/Time-MoE,
``time_moe/models/modeling_time_moe.py`` and ``ts_generation_mixin.py``) and its public checkpoints
``Maple728/TimeMoE-50M`` / ``-200M``:

- every time point is a token, embedded by ``silu(gate_layer(x)) * emb_layer(x)`` (no bias);
- pre-norm decoder layers: RMSNorm (eps 1e-6, fp32 variance), causal attention with q/k/v biases,
  no o bias, rotary embeddings (rotate-half, theta 10000, absolute positions also under the KV
  cache), RMSNorm, an MoE FFN; a final RMSNorm;
- MoE FFN: softmax over E experts then top-k **without renormalisation**; each expert a SwiGLU of
  width ``intermediate_size // k``; plus one shared SwiGLU expert of width ``intermediate_size``
  scaled by ``sigmoid(w . h)`` per token;
- one linear head per horizon in ``horizon_lengths``: at position t, head h predicts x[t+1..t+h].

The state dict is moezoo's (the stacked expert bank); :meth:`TimeMoE.from_pretrained` and
:meth:`TimeMoE.save_pretrained` read and write the reference layout through the adapters of
:mod:`moezoo.modalities.timeseries.convert`, so the public checkpoints load and the reference code
loads what moezoo saves.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moezoo.checks import require_int
from moezoo.kernels.activations import get_activation
from moezoo.layers.attention import KVCache, MultiHeadAttention
from moezoo.layers.experts import Experts
from moezoo.layers.mlp import MLP
from moezoo.layers.moe import MoE
from moezoo.layers.routed import KeepsLastForward
from moezoo.modalities.timeseries.losses import autoregressive_loss, time_moe_balance_loss
from moezoo.routers.top_k import TopKRouter

__all__ = [
    "CONFIG_FIELDS",
    "RMSNorm",
    "TimeMoE",
    "TimeMoELoss",
]

CONFIG_NAME = "config.json"
#: The hub repo holding the reference's modeling code (the same for every Time-MoE size), which the
#: ``auto_map`` of a saved ``config.json`` names.
REMOTE_CODE = "Maple728/TimeMoE-50M"
#: The transformers version the reference code runs on (its requirements; it fails on transformers 5).
REFERENCE_TRANSFORMERS_VERSION = "4.40.1"

#: config.json fields of the reference ``TimeMoeConfig`` that define the network, as constructor
#: arguments of :class:`TimeMoE` (same names).
CONFIG_FIELDS = (
    "input_size", "hidden_size", "intermediate_size", "horizon_lengths", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "hidden_act", "num_experts_per_tok", "num_experts",
    "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_dense", "rope_theta",
    "attention_dropout", "router_aux_loss_factor",
)

#: HF activation names (``transformers.activations.ACT2FN``) -> moezoo's.
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu", "gelu_pytorch_tanh": "gelu_tanh"}


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the mean taken in fp32 (LLaMA / the reference)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim)."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class InputEmbedding(nn.Module):
    """The reference's point-wise embedding: ``act(gate_layer(x)) * emb_layer(x)``, two 1 -> D linears."""

    def __init__(self, dim: int, activation: str = "silu") -> None:
        super().__init__()
        self.emb_layer = nn.Linear(1, dim, bias=False)
        self.gate_layer = nn.Linear(1, dim, bias=False)
        self.act = get_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, length) -> (batch, length, dim)."""
        x = x.unsqueeze(-1)
        return self.act(self.gate_layer(x)) * self.emb_layer(x)


class DecoderLayer(KeepsLastForward):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``; the FFN is an MoE (or a dense
    SwiGLU with ``use_dense``). Keeps the router logits of its last forward in ``router_logits``
    (detached in a copy of the layer)."""

    def __init__(self, index: int, dim: int, intermediate: int, num_heads: int, num_kv_heads: int,
                 num_experts: int, k: int, activation: str, eps: float, rope_theta: float, attention_dropout: float,
                 use_dense: bool, backend: str) -> None:
        super().__init__()
        self.index = index
        self.self_attn = MultiHeadAttention(dim, num_heads, num_kv_heads=num_kv_heads, qkv_bias=True,
                                            dropout=attention_dropout, rotate_fraction=1.0, rope_base=rope_theta)
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.router_logits: Tensor | None = None
        if use_dense:
            self.ffn_layer = MLP(dim, intermediate, activation, gated=True, bias=False)
        else:
            self.ffn_layer = MoE(
                dim, intermediate // k, num_experts, TopKRouter(dim, num_experts, k=k),
                shared_experts=1, shared_hidden=intermediate, shared_gate=True,
                activation=activation, gated=True, bias=False, backend=backend,
            )
            self.ffn_layer.router.register_forward_hook(self._keep_router_logits)

    def _keep_router_logits(self, module: nn.Module, args: Any, routing: Any) -> None:
        self.router_logits = routing.logits

    def forward(self, x: Tensor, cache: KVCache | None) -> Tensor:
        """x: (batch, n, dim) -> (batch, n, dim)."""
        x = x + self.self_attn(self.input_layernorm(x), causal=True, cache=cache, layer_index=self.index)
        return x + self.ffn_layer(self.post_attention_layernorm(x))


class TimeMoEBackbone(nn.Module):
    """Embedding, decoder layers and final norm (the reference's ``TimeMoeModel``)."""

    def __init__(self, dim: int, layers: list[DecoderLayer], activation: str, eps: float) -> None:
        super().__init__()
        self.embed_layer = InputEmbedding(dim, activation)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(dim, eps)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x: (batch, n) values at positions ``cache.length ..`` -> (batch, n, dim) normed hidden states."""
        h = self.embed_layer(x)
        for layer in self.layers:
            h = layer(h, cache)
        return self.norm(h)


class OutputHead(nn.Module):
    """One forecasting head: ``out_layer`` D -> horizon, no bias."""

    def __init__(self, dim: int, horizon: int) -> None:
        super().__init__()
        self.out_layer = nn.Linear(dim, horizon, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.out_layer(h)


@dataclass
class TimeMoELoss:
    """The reference objective ``loss = ar_loss + router_aux_loss_factor * aux_loss`` and its parts."""

    loss: Tensor
    ar_loss: Tensor
    aux_loss: Tensor | None


class TimeMoE(nn.Module):
    """Time-MoE forecaster; ``forward(x: (batch, length)) -> [per head (batch, length, h)]``.

    Constructor arguments are the reference ``TimeMoeConfig`` fields (same names and meaning), so a
    ``config.json`` maps onto them one to one; defaults are TimeMoE-50M's.

    Args:
        input_size: values per token; the public checkpoints use 1, the only size supported.
        hidden_size: model width D.
        intermediate_size: width of the shared expert; routed experts are ``intermediate_size // k``.
        horizon_lengths: the forecasting heads' horizons (ascending, as in the reference).
        num_hidden_layers: decoder layers.
        num_attention_heads: attention heads.
        num_key_value_heads: KV heads (grouped-query attention); None = ``num_attention_heads``.
        hidden_act: expert and embedding activation (HF name: "silu", "gelu", "relu", ...).
        num_experts_per_tok: k.
        num_experts: E routed experts.
        max_position_embeddings: the reference's RoPE cache size; positions beyond it still work
            (the reference extends its cache too), kept for config round trips.
        initializer_range: std of the N(0, std) init of every linear weight (biases 0).
        rms_norm_eps: RMSNorm epsilon.
        use_dense: a dense SwiGLU FFN of width ``intermediate_size`` instead of the MoE (no aux loss).
        rope_theta: RoPE base.
        attention_dropout: dropout on the attention weights in training.
        router_aux_loss_factor: weight of the balance loss in :meth:`loss` (0.02).
        embed_init_std: std of the N(0, std) init of the two 1 -> D embedding weights; None uses
            ``initializer_range`` as the reference. With 0.02, ``silu(0.02 x) * 0.02 x`` is almost
            ``x**2`` (blind to the sign of x) until training grows the gate, which costs the reference
            nothing over 100k steps but stalls a short pre-training; an init-only setting, not saved.
        backend: expert-computation backend of :func:`moezoo.kernels.expert_mlp`.
    """

    def __init__(
        self,
        input_size: int = 1,
        hidden_size: int = 384,
        intermediate_size: int = 1536,
        horizon_lengths: Sequence[int] | int = (1, 8, 32, 64),
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        num_experts_per_tok: int = 2,
        num_experts: int = 8,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_dense: bool = False,
        rope_theta: float = 10000.0,
        attention_dropout: float = 0.0,
        router_aux_loss_factor: float = 0.02,
        embed_init_std: float | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if input_size != 1:
            raise ValueError(f"TimeMoE: input_size must be 1 (point-wise univariate tokens), got {input_size!r}")
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_experts_per_tok", "num_experts", "max_position_embeddings"):
            require_int("TimeMoE", name, locals()[name])
        if isinstance(horizon_lengths, int):
            horizon_lengths = [horizon_lengths]
        horizons = list(horizon_lengths)
        if not horizons or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in horizons):
            raise ValueError(f"TimeMoE: horizon_lengths must be a non-empty list of ints >= 1, got {horizon_lengths!r}")
        kv_heads = num_attention_heads if num_key_value_heads is None else require_int(
            "TimeMoE", "num_key_value_heads", num_key_value_heads)
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"TimeMoE: hidden_size={hidden_size} must be divisible by num_attention_heads={num_attention_heads}")
        if num_attention_heads % kv_heads:
            raise ValueError(
                f"TimeMoE: num_attention_heads={num_attention_heads} must be a multiple of num_key_value_heads={kv_heads}")
        if hidden_act not in _HF_ACTIVATIONS:
            raise ValueError(f"TimeMoE: hidden_act must be one of {sorted(_HF_ACTIVATIONS)}, got {hidden_act!r}")
        if not use_dense and num_experts_per_tok > num_experts:
            raise ValueError(
                f"TimeMoE: num_experts_per_tok={num_experts_per_tok} must be <= num_experts={num_experts}")
        if not use_dense and intermediate_size // num_experts_per_tok < 1:
            raise ValueError(f"TimeMoE: intermediate_size={intermediate_size} is too small for k={num_experts_per_tok}")
        if not 0.0 <= attention_dropout < 1.0:
            raise ValueError(f"TimeMoE: attention_dropout must be in [0, 1), got {attention_dropout}")
        if router_aux_loss_factor < 0 or initializer_range <= 0 or rms_norm_eps <= 0 or rope_theta <= 0:
            raise ValueError(
                "TimeMoE: router_aux_loss_factor must be >= 0 and initializer_range, rms_norm_eps, rope_theta > 0; "
                f"got {router_aux_loss_factor}, {initializer_range}, {rms_norm_eps}, {rope_theta}"
            )
        self.config: dict[str, Any] = {
            "input_size": 1, "hidden_size": hidden_size, "intermediate_size": intermediate_size,
            "horizon_lengths": horizons, "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads, "num_key_value_heads": kv_heads, "hidden_act": hidden_act,
            "num_experts_per_tok": num_experts_per_tok, "num_experts": num_experts,
            "max_position_embeddings": max_position_embeddings, "initializer_range": initializer_range,
            "rms_norm_eps": rms_norm_eps, "use_dense": bool(use_dense), "rope_theta": rope_theta,
            "attention_dropout": attention_dropout, "router_aux_loss_factor": router_aux_loss_factor,
        }
        self.horizon_lengths = horizons
        self.k = num_experts_per_tok
        self.use_dense = bool(use_dense)
        self.router_aux_loss_factor = router_aux_loss_factor
        activation = _HF_ACTIVATIONS[hidden_act]
        layers = [
            DecoderLayer(i, hidden_size, intermediate_size, num_attention_heads, kv_heads, num_experts,
                         num_experts_per_tok, activation, rms_norm_eps, rope_theta, attention_dropout, self.use_dense,
                         backend)
            for i in range(num_hidden_layers)
        ]
        self.model = TimeMoEBackbone(hidden_size, layers, activation, rms_norm_eps)
        self.lm_heads = nn.ModuleList(OutputHead(hidden_size, h) for h in horizons)
        # As the reference's dict: a repeated horizon maps to its last head.
        self._head_of = {h: i for i, h in enumerate(horizons)}
        if embed_init_std is not None and embed_init_std <= 0:
            raise ValueError(f"TimeMoE: embed_init_std must be > 0 or None, got {embed_init_std}")
        self.embed_init_std = embed_init_std
        #: Where the weights came from (transformers' ``name_or_path``), written as ``_name_or_path``.
        self.name_or_path = "time_moe"
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference init: every linear weight (experts included) N(0, initializer_range), biases 0,
        norms 1; the embedding weights N(0, embed_init_std) when that is set."""
        std = self.config["initializer_range"]
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, Experts):
                module.w_in.normal_(0.0, std)
                module.w_out.normal_(0.0, std)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        if self.embed_init_std is not None:
            self.model.embed_layer.emb_layer.weight.normal_(0.0, self.embed_init_std)
            self.model.embed_layer.gate_layer.weight.normal_(0.0, self.embed_init_std)

    # -- forward and objective -------------------------------------------------------------------
    def hidden_states(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """x: (batch, n) -> (batch, n, hidden_size); with ``cache``, x continues the cached positions."""
        if x.dim() != 2:
            raise ValueError(f"TimeMoE: x must have shape (batch, length), got {tuple(x.shape)}")
        return self.model(x.to(self.lm_heads[0].out_layer.weight.dtype), cache)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> list[Tensor]:
        """x: (batch, length) -> per head j (batch, length, horizon_lengths[j])."""
        h = self.hidden_states(x, cache)
        return [head(h) for head in self.lm_heads]

    @property
    def router_logits(self) -> list[Tensor]:
        """Per layer, the (batch * n, num_experts) fp32 router logits of the last forward."""
        return [layer.router_logits for layer in self.model.layers if layer.router_logits is not None]

    def loss(self, x: Tensor, labels: Tensor, loss_mask: Tensor | None = None) -> TimeMoELoss:
        """The reference training objective on a window.

        Args:
            x: (batch, length) inputs.
            labels: (batch, length), ``labels[:, t]`` = the value after ``x[:, t]``.
            loss_mask: (batch, length) 1 for real labels, 0 for padding; None = all real.
        """
        if labels.shape != x.shape or (loss_mask is not None and loss_mask.shape != x.shape):
            raise ValueError(
                f"TimeMoE.loss: x {tuple(x.shape)}, labels {tuple(labels.shape)} and loss_mask "
                f"{None if loss_mask is None else tuple(loss_mask.shape)} must have the same shape"
            )
        predictions = self(x)
        ar = autoregressive_loss(predictions, self.horizon_lengths, labels, loss_mask)
        if self.use_dense:
            return TimeMoELoss(ar, ar, None)
        aux = time_moe_balance_loss(self.router_logits, self.k)
        return TimeMoELoss(ar + self.router_aux_loss_factor * aux.to(ar.dtype), ar, aux)

    # -- generation --------------------------------------------------------------------------------
    def select_head(self, remaining: int) -> int:
        """Index of the head the reference uses when ``remaining`` points are still to forecast: the
        first horizon, then each next one while it is <= remaining (config order, stopping at the
        first larger one). A head longer than ``remaining`` is cut to ``remaining`` by the caller."""
        chosen = self.horizon_lengths[0]
        for h in self.horizon_lengths[1:]:
            if h > remaining:
                break
            chosen = h
        return self._head_of[chosen]

    @torch.no_grad()
    def forecast(self, context: Tensor, horizon: int, normalize: bool = False, use_cache: bool = True) -> Tensor:
        """Greedy multi-resolution forecast, as the reference's ``generate``.

        Each step feeds the points not yet seen (the context first, then the last chunk) and appends
        the last position's prediction of the head :meth:`select_head` picks for the remaining
        horizon, until ``horizon`` points are out.

        Args:
            context: (batch, length) history.
            horizon: points to forecast (any number; longer than the longest head is done in steps).
            normalize: z-score each series with its context mean and std (torch's unbiased std, as
                the reference README; a constant context uses std 1) and undo it on the forecast.
            use_cache: keep keys and values between steps (the reference does); False recomputes
                the whole sequence at every step (same values, slower).

        Returns:
            (batch, horizon) in the context's dtype.
        """
        if context.dim() != 2 or context.shape[1] < 1:
            raise ValueError(f"forecast: context must have shape (batch, length >= 1), got {tuple(context.shape)}")
        require_int("forecast", "horizon", horizon)
        dtype = self.lm_heads[0].out_layer.weight.dtype
        series = context.to(dtype)
        if normalize:
            if context.shape[1] < 2:
                raise ValueError("forecast: normalize=True needs a context of at least 2 points")
            mean, std = series.mean(dim=-1, keepdim=True), series.std(dim=-1, keepdim=True)
            std = torch.where(std == 0, torch.ones_like(std), std)
            series = (series - mean) / std
        was_training = self.training
        self.eval()
        try:
            cache = KVCache() if use_cache else None
            step_input, seen, chunks, produced = series, series, [], 0
            while produced < horizon:
                remaining = horizon - produced
                head = self.lm_heads[self.select_head(remaining)]
                hidden = self.hidden_states(step_input if use_cache else seen, cache)
                chunk = head(hidden[:, -1])[:, :remaining]
                chunks.append(chunk)
                produced += chunk.shape[1]
                step_input, seen = chunk, torch.cat([seen, chunk], dim=1)
        finally:
            self.train(was_training)
        out = torch.cat(chunks, dim=1)
        if normalize:
            out = out * std + mean
        return out.to(context.dtype)

    # -- reference layout IO ---------------------------------------------------------------------
    @staticmethod
    def config_from_dict(config: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
        """Constructor arguments from a reference ``config.json`` dict; other fields (architectures,
        auto_map, torch_dtype, transformers_version, use_cache, ...) carry no network settings."""
        if config.get("model_type", "time_moe") != "time_moe":
            raise ValueError(f"{source}: model_type must be 'time_moe', got {config.get('model_type')!r}")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
                   if k not in config]
        if missing:
            raise ValueError(f"{source}: missing Time-MoE config fields {missing}")
        use_dense = bool(config.get("use_dense", False))
        if "apply_aux_loss" in config and bool(config["apply_aux_loss"]) == use_dense:
            raise ValueError(
                f"{source}: the reference requires apply_aux_loss == not use_dense, got "
                f"apply_aux_loss={config['apply_aux_loss']}, use_dense={use_dense}"
            )
        # The reference TimeMoeConfig defaults, for fields a config.json leaves out.
        defaults = {"input_size": 1, "horizon_lengths": 1, "num_key_value_heads": None, "hidden_act": "silu",
                    "num_experts_per_tok": 2, "num_experts": 1, "max_position_embeddings": 32768,
                    "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_dense": False, "rope_theta": 10000,
                    "attention_dropout": 0.0, "router_aux_loss_factor": 0.02}
        return {name: config.get(name, defaults.get(name)) for name in CONFIG_FIELDS}

    def reference_config(self, *, remote_code: str | None = REMOTE_CODE) -> dict[str, Any]:
        """The ``config.json`` the reference writes for this network, with what transformers needs
        to load it through the reference code: ``transformers_version`` (the one the reference code
        runs on) and ``auto_map`` to its ``TimeMoeConfig`` and ``TimeMoeForPrediction``.

        Args:
            remote_code: the hub repo whose modeling code ``auto_map`` names (transformers' ``repo--module.Class``
                form), so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
                fetches it; None names the modules alone, as the hub repos do, for a folder that holds
                the reference's ``configuration_time_moe.py`` and ``modeling_time_moe.py`` itself.
        """
        dtype = str(self.lm_heads[0].out_layer.weight.dtype).removeprefix("torch.")
        prefix = "" if remote_code is None else f"{remote_code}--"
        return {
            **self.config,
            "_name_or_path": self.name_or_path,
            "apply_aux_loss": not self.use_dense,
            "architectures": ["TimeMoeForPrediction"],
            "auto_map": {
                "AutoConfig": f"{prefix}configuration_time_moe.TimeMoeConfig",
                "AutoModelForCausalLM": f"{prefix}modeling_time_moe.TimeMoeForPrediction",
            },
            "model_type": "time_moe",
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            "transformers_version": REFERENCE_TRANSFORMERS_VERSION,
            "use_cache": True,
        }

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device_map: str | int | torch.device | Mapping[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool | None = None,
        backend: str = "auto",
    ) -> TimeMoE:
        """A model from a folder (or HF hub repo id) holding the reference's ``config.json`` and
        ``model.safetensors`` or a sharded ``model.safetensors.index.json`` (e.g.
        ``"Maple728/TimeMoE-50M"``, a ``save_pretrained`` folder, a ``moezoo zoo export`` folder),
        with transformers' keywords.

        The hub is reached through :func:`moezoo.zoo.hub.hub_download` (its cache, HF_HUB_OFFLINE
        and HF_HOME apply; ``cache_dir``, ``revision``, ``token`` and ``local_files_only`` go to it).
        Weights are loaded all-or-nothing by :func:`moezoo.zoo.checkpoint.load_checkpoint`: a
        missing or unexpected key or a wrong shape raises a ``CheckpointError`` naming the reference
        keys.

        Args:
            dtype: the parameters' dtype (``torch_dtype`` is its older name): None (the default)
                gives float32 whatever the file's dtype (the public checkpoints are bfloat16), as
                transformers 4 does; ``"auto"`` the dtype the checkpoint was saved in (its config's
                ``torch_dtype``, as transformers 5's default); or a dtype.
            device_map: the one device to put the model on (``"cuda:0"``, ``"auto"``, ``{"": device}``).
            trust_remote_code: accepted for transformers' calls and ignored: the code is moezoo's.
            backend: expert-computation backend of :func:`moezoo.kernels.expert_mlp`.
        """
        from moezoo.modalities.timeseries.convert import REFERENCE_LAYOUT
        from moezoo.zoo.checkpoint import load_checkpoint
        from moezoo.zoo.hf import resolve_device, resolve_dtype

        owner = "TimeMoE.from_pretrained"
        device = resolve_device(device_map, owner=owner)
        folder = Path(os.path.expanduser(str(path_or_hub_id)))
        if not folder.is_dir():
            if folder.exists() or str(path_or_hub_id).count("/") != 1:
                raise FileNotFoundError(f"{owner}: {path_or_hub_id!r} is neither a folder nor a hub id 'owner/name'")
            from moezoo.zoo.hub import hub_download

            hub_kwargs = {"cache_dir": cache_dir, "token": token, "local_files_only": local_files_only}
            folder = hub_download(str(path_or_hub_id), revision=revision, allow_patterns=[CONFIG_NAME, "*.safetensors",
                                  "*.safetensors.index.json"], **{k: v for k, v in hub_kwargs.items() if v})
        config_file = folder / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{owner}: no {CONFIG_NAME} in {folder}")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{owner}: {config_file} is not valid JSON ({err})") from err
        target_dtype = resolve_dtype(dtype, torch_dtype, config.get("dtype", config.get("torch_dtype")), owner=owner)
        model = cls(**cls.config_from_dict(config, str(config_file)), backend=backend)
        load_checkpoint(model, folder, entry=str(path_or_hub_id), adapter=REFERENCE_LAYOUT)
        model.name_or_path = str(path_or_hub_id)
        return model.to(device=device, dtype=target_dtype)

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        remote_code: str | None = REMOTE_CODE,
        **hub_kwargs: Any,
    ) -> Path:
        """Write ``config.json`` (:meth:`reference_config`; with moezoo's record when the model came
        from :func:`moezoo.create_model`) and the weights in the reference layout, as
        ``model.safetensors`` or, past ``max_shard_size`` (transformers' default "5GB"), shards and
        ``model.safetensors.index.json`` — loadable by :meth:`from_pretrained`,
        ``moezoo.create_model(checkpoint_path=directory)`` and the reference code. The weights are
        written atomically (see :func:`moezoo.zoo.checkpoint.save_checkpoint`), the config last.

        Args:
            safe_serialization: must be True: moezoo writes safetensors only.
            push_to_hub: then upload the folder to ``repo_id`` (default: the folder's name) with
                ``hub_kwargs`` (``token``, ``private``, ``revision``, ``commit_message``, ``create_pr``;
                see :func:`moezoo.zoo.hub.upload_folder`).
            remote_code: see :meth:`reference_config`.
        """
        from moezoo.modalities.timeseries.convert import to_reference
        from moezoo.zoo.checkpoint import save_checkpoint, write_text_atomically

        if not safe_serialization:
            raise ValueError("TimeMoE.save_pretrained: safe_serialization must be True (moezoo writes safetensors only)")
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        # transformers refuses safetensors files without the "format" metadata.
        save_checkpoint(to_reference(self.state_dict()), target, metadata={"format": "pt"},
                        max_shard_size=max_shard_size)
        config = self.reference_config(remote_code=remote_code)
        if getattr(self, "moezoo_entry", None) is not None:
            config["moezoo"] = {"entry": self.moezoo_entry, "args": dict(getattr(self, "moezoo_args", {}))}
        write_text_atomically(target / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        if push_to_hub:
            from moezoo.zoo.hub import upload_folder

            upload_folder(target, repo_id or target.resolve().name, **hub_kwargs)
        return target

    def push_to_hub(self, repo_id: str, *, max_shard_size: int | str = "5GB", remote_code: str | None = REMOTE_CODE,
                    **hub_kwargs: Any) -> str:
        """Save (:meth:`save_pretrained`) into a temporary folder and upload it to the hub repo
        ``repo_id`` in one commit (created if needed); returns the commit URL. ``hub_kwargs`` as
        :func:`moezoo.zoo.hub.upload_folder` takes them."""
        from moezoo.zoo.hub import upload_folder

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "model", max_shard_size=max_shard_size, remote_code=remote_code)
            return upload_folder(folder, repo_id, **hub_kwargs)
