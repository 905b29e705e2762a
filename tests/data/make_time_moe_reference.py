"""Generate tests/data/time_moe_reference/ from the public Time-MoE reference code.

CI never runs this script: it needs transformers 4.40.1 and a Time-MoE checkout. It imports the
reference; no Time-MoE code is copied here. Provenance and the keys: tests/data/time_moe_reference.md.

Environment (Python 3.11, CPU):

    python3.11 -m venv /work/venvs/fx-timemoe
    /work/venvs/fx-timemoe/bin/pip install torch==2.13.0 transformers==4.40.1 numpy==1.26.4 safetensors
    git clone https://github.com/Time-MoE/Time-MoE /work/refs/Time-MoE
    git -C /work/refs/Time-MoE checkout d3524fdaa5c0e83a29a6cc01828194dd870ec7b6

(torch 2.13.0 is the CPU wheel, torch-2.13.0+cpu.) Run from the repository root:

    /work/venvs/fx-timemoe/bin/python tests/data/make_time_moe_reference.py \
        --time-moe /work/refs/Time-MoE --out tests/data/time_moe_reference

Every random number comes from one torch stream, `torch.manual_seed(20240916)`, in this order: the
reference's own init while building the model, the replacement init (parameter by parameter in
`named_parameters` order), the three context series, then the labels' extra step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

SEED = 20240916
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, horizon_lengths=[1, 4, 8],
              rope_theta=10000, rms_norm_eps=1e-6, router_aux_loss_factor=0.02,
              max_position_embeddings=4096)
CONTEXT_LENGTH = 40
HORIZONS = [1, 3, 4, 5, 8, 9, 17, 30]  # 9, 17, 30 run past the longest head (8)
README_HORIZON = 13
README_SCALE, README_SHIFT = 10.0, 5.0
# The labelled batch: row 1 is a 35-step series padded to the window (the reference window
# dataset's padding), row 2 keeps its values but masks the loss after step 25.
PADDED_ROW, PADDED_LENGTH = 1, 35
MASKED_ROW, MASKED_FROM = 2, 25


@torch.no_grad()
def reinit_o1(model: torch.nn.Module) -> None:
    """Replace the reference's N(0, 0.02) init by O(1) values, so outputs are not all about zero.

    Norm weights 1 + 0.2 N(0,1); biases 0.2 N(0,1); the input embedding N(0,1); router gates
    N(0, 4/fan_in); every other weight N(0, 1/fan_in). Each parameter draws once, in order.
    """
    for name, p in model.named_parameters():
        if "norm" in name:
            value = 1 + 0.2 * torch.randn_like(p)
        elif name.endswith("bias"):
            value = 0.2 * torch.randn_like(p)
        elif "embed_layer" in name:
            value = torch.randn_like(p)
        else:
            gain = 2 if name.endswith("ffn_layer.gate.weight") else 1
            value = gain * torch.randn_like(p) / math.sqrt(p.shape[1])
        p.copy_(value)


def make_context() -> torch.Tensor:
    """(3, 40): a noisy sine (period 12), a random walk, a cosine (period 7) with a trend."""
    t = torch.arange(CONTEXT_LENGTH, dtype=torch.float32)
    sine = torch.sin(2 * math.pi * t / 12) + 0.1 * torch.randn(CONTEXT_LENGTH)
    walk = torch.cumsum(0.3 * torch.randn(CONTEXT_LENGTH), 0)
    trend = 0.5 * torch.cos(2 * math.pi * t / 7) + 0.05 * t + 0.2 * torch.randn(CONTEXT_LENGTH)
    return torch.stack([sine, walk, trend])


def labelled_batch(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, labels, loss_masks), each (3, 40), built as Time-MoE's window dataset does.

    The windows are 41 steps: the context plus one more random step per row, inputs = steps
    0..39, labels = steps 1..40, mask 1 where the label is real.
    """
    seq = torch.cat([context, torch.randn(context.shape[0], 1)], dim=1)
    mask = torch.ones(context.shape[0], CONTEXT_LENGTH)
    seq[PADDED_ROW, PADDED_LENGTH:] = 0
    mask[PADDED_ROW, PADDED_LENGTH - 1:] = 0
    mask[MASKED_ROW, MASKED_FROM:] = 0
    return seq[:, :-1].clone(), seq[:, 1:].clone(), mask


def loss_value(output) -> np.ndarray:
    return np.asarray([output.loss.item()], dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-moe", type=Path, required=True,
                        help="Time-MoE checkout at d3524fd")
    parser.add_argument("--out", type=Path, default=Path("tests/data/time_moe_reference"))
    args = parser.parse_args()
    sys.path.insert(0, str(args.time_moe))
    import transformers
    from time_moe.models.configuration_time_moe import TimeMoeConfig
    from time_moe.models.modeling_time_moe import TimeMoeForPrediction, load_balancing_loss_func

    torch.manual_seed(SEED)
    config = TimeMoeConfig(**CONFIG, _attn_implementation="eager")
    model = TimeMoeForPrediction(config)
    reinit_o1(model)
    model.eval()
    context = make_context()
    inputs, labels, masks = labelled_batch(context)

    # The reference unsqueezes input_ids (TimeMoeModel.forward), labels and loss_masks
    # (calc_ar_loss) in place: every call below gets its own copies.
    out: dict[str, np.ndarray] = {}
    out["meta"] = np.str_(json.dumps({"torch": torch.__version__, "horizons": HORIZONS,
                                      "readme_horizon": README_HORIZON,
                                      "transformers": transformers.__version__}))
    out["context"] = context.numpy()
    with torch.no_grad():
        for h in HORIZONS:
            out[f"generate/{h}"] = model.generate(context.clone(), max_new_tokens=h)[:, -h:].numpy()

        # The README's flow: z-score each series, forecast, undo the scaling.
        raw = context * README_SCALE + README_SHIFT
        mean, std = raw.mean(dim=-1, keepdim=True), raw.std(dim=-1, keepdim=True)
        normed = model.generate((raw - mean) / std, max_new_tokens=README_HORIZON)
        out["readme/raw_context"] = raw.numpy()
        out[f"readme/{README_HORIZON}"] = (normed[:, -README_HORIZON:] * std + mean).numpy()

        decoded = model.model(input_ids=context.clone(), use_cache=False)
        hidden = decoded.last_hidden_state
        out["forward/hidden"] = hidden.numpy()
        for j, head in enumerate(model.lm_heads):
            out[f"forward/head{j}"] = head(hidden).numpy()
        for i, logits in enumerate(decoded.router_logits):
            out[f"forward/router_logits{i}"] = logits.numpy()

        out["loss/input_ids"] = inputs.numpy()
        out["loss/labels"] = labels.numpy()
        out["loss/loss_masks"] = masks.numpy()
        out["loss/loss_masked"] = loss_value(model(input_ids=inputs.clone(), labels=labels.clone(),
                                                   loss_masks=masks.clone()))
        out["loss/loss_unmasked"] = loss_value(model(input_ids=inputs.clone(),
                                                     labels=labels.clone()))
        router_logits = model.model(input_ids=inputs.clone(), use_cache=False).router_logits
        aux = load_balancing_loss_func(router_logits, top_k=config.num_experts_per_tok,
                                       num_experts=config.num_experts)
        out["loss/aux"] = np.asarray([aux.item()], dtype=np.float64)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    np.savez(args.out / "expected.npz", **out)
    print(f"wrote {args.out}/config.json, model.safetensors and {len(out)} arrays in expected.npz")


if __name__ == "__main__":
    main()
