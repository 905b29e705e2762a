"""Time-series zoo entries: the public Time-MoE checkpoints (HF hub) and a tiny model of our own."""

from __future__ import annotations

from moezoo.modalities.timeseries.convert import REFERENCE_LAYOUT
from moezoo.modalities.timeseries.model import TimeMoE
from moezoo.zoo.registry import PretrainedCfg, ShippedEvaluation, register_model, register_shipped

#: What every Time-MoE expects (the reference README and run_eval.py).
_INPUT_SPEC = {
    "input": "(batch, length) float series, one value per time step",
    "normalization": "z-score each series by its context (forecast(..., normalize=True)) unless already scaled",
    "max_context": 4096,
}

def hub_config(model: TimeMoE) -> dict:
    """The reference ``config.json`` of a zoo Time-MoE, for exported folders (so that
    ``TimeMoE.from_pretrained`` and the reference code read them)."""
    return {**model.reference_config(), "_name_or_path": model.moezoo_entry}


#: The public checkpoints' config.json (MODELS.md §5c): TimeMoE-50M and TimeMoE-200M.
TIME_MOE_SIZES = {
    "50m": dict(hidden_size=384, intermediate_size=1536),
    "200m": dict(hidden_size=768, intermediate_size=3072),
}
_COMMON = dict(
    input_size=1, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12, num_experts=8,
    num_experts_per_tok=2, horizon_lengths=[1, 8, 32, 64], max_position_embeddings=4096, rope_theta=10000,
    rms_norm_eps=1e-6, hidden_act="silu", use_dense=False, router_aux_loss_factor=0.02,
)

for size, dims in TIME_MOE_SIZES.items():
    hub_id = f"Maple728/TimeMoE-{size.upper()}"
    register_model(
        f"time_moe_{size}",
        TimeMoE,
        modality="timeseries",
        description=(
            f"Time-MoE {'base' if size == '50m' else 'large'} ({hub_id}): 12 layers, width {dims['hidden_size']}, "
            "top-2 of 8 experts + gated shared expert, heads 1/8/32/64; pretrained on Time-300B"
        ),
        # The upstream hub card (Maple728/TimeMoE-50M, -200M) licenses the weights apache-2.0.
        pretrained_cfg=PretrainedCfg(source=f"hf-hub:{hub_id}", license="apache-2.0", input_spec=dict(_INPUT_SPEC)),
        checkpoint_adapter=REFERENCE_LAYOUT,
        hf_config=hub_config,
        card={"license": "apache-2.0", "task": "time-series-forecasting",
              "tags": ["moezoo", "mixture-of-experts", "time-moe", "time-series-forecasting"]},
        **_COMMON,
        **dims,
    )

#: The tiny CPU model of configs/timeseries/time_moe_tiny.yaml.
TIME_MOE_TINY = dict(
    hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_experts=8,
    num_experts_per_tok=2, horizon_lengths=[1, 8, 32, 64], max_position_embeddings=4096, embed_init_std=1.0,
)

_ZERO_SHOT_SERIES = ShippedEvaluation(
    "moezoo.modalities.timeseries.evaluate:evaluate_zero_shot", task="time-series-forecasting",
    split="last 20% of each series (zero-shot)",
    dataset_name="built-in real series (Taylor electricity, Mauna Loa CO2, monthly sunspots, El Nino SST)",
    datasets=("pmdarima-statsmodels-series",), card_metrics=("mase", "seasonal_naive_mase", "relative_mase"))

register_shipped(
    "time_moe_tiny",
    TimeMoE,
    modality="timeseries",
    description=(
        "Time-MoE-tiny (width 96, 4 layers, top-2 of 8 experts + gated shared expert) pre-trained on the "
        "built-in KernelSynth-style synthetic corpus; zero-shot forecaster for CPU demos"
    ),
    input_spec={**_INPUT_SPEC, "trained_context": 512},
    checkpoint_adapter=REFERENCE_LAYOUT,  # released in the reference layout, as the public checkpoints
    hf_config=hub_config,
    evaluation=_ZERO_SHOT_SERIES,
    tags=["mixture-of-experts", "time-moe", "time-series-forecasting", "zero-shot"],
    architecture=(
        "Time-MoE (Shi et al. 2024) decoder: point-wise tokens embedded by silu(W_g x) * (W_e x), 4 pre-norm "
        "layers of width 96 (RMSNorm, 4-head causal attention with RoPE theta 10000 and q/k/v biases), each "
        "FFN an MoE: softmax router, top-2 of 8 SwiGLU experts (width 192, weights not renormalised) plus a "
        "SwiGLU shared expert (width 384) gated by sigmoid(w.h); forecasting heads of 1, 8, 32 and 64 steps, "
        "greedy multi-resolution generation. Trained with the reference objective: Huber loss (delta 2) "
        "averaged over the heads plus 0.02 x the load-balancing loss over all layers' router logits. "
        "Pre-trained for 2,000 steps of 16 windows of 512 points on 2,000 KernelSynth-style Gaussian-process "
        "series (corpus seed 0, training seed 9899; the run was stopped at step 1,870 and resumed from its "
        "step-1,750 checkpoint), AdamW lr 1e-2 (50 warmup steps, cosine to 5e-4), "
        "weight decay 0.1, betas (0.9, 0.95), clipping 1.0; the reference N(0, 0.02) init except the two "
        "1 -> 96 embedding weights, N(0, 1). It has never seen the evaluation series. The "
        "evaluation forecasts from 512-point contexts, z-scored per window, at origins every horizon over "
        "the last 20% of each series: Taylor h=48 (m=48), CO2 h=52 (m=52), sunspots h=24 (m=12), El Nino "
        "h=12 (m=12); MASE is scaled by the seasonal-naive error inside each context."
    ),
    limitations=(
        "A demonstration-scale model (2.4M parameters, 1.0M active per token; 2,000 steps at about 1.1 s a "
        "step on a 2-core CPU, synthetic data only): it is no substitute for the public TimeMoE-50M/200M "
        "checkpoints (entries time_moe_50m and time_moe_200m). The zero-shot figures rest on 59 forecast "
        "windows in all (8 to 24 per series), so differences of a few percent are within noise: it beats the "
        "seasonal-naive forecast clearly on CO2 and El Nino and only ties it on Taylor and sunspots. Weights "
        "ship in float16."
    ),
    **TIME_MOE_TINY,
)

register_model(
    "time_moe",
    TimeMoE,
    modality="timeseries",
    description=(
        "Time-MoE of any architecture (TimeMoE-50M's otherwise): what a folder with a reference config.json "
        "(model_type time_moe, e.g. written by TimeMoE.save_pretrained) loads as, with create_model(checkpoint_path=...)"
    ),
    checkpoint_adapter=REFERENCE_LAYOUT,
    hf_config=hub_config,
    hf_model_type="time_moe",
    from_hf_config=TimeMoE.config_from_dict,
)
