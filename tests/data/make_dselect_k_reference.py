"""Generate tests/data/dselect_k_reference.npz from the official DSelect-k gate (TensorFlow).

CI never runs this script: it needs TensorFlow and the official file
google-research/google-research ``dselect_k_moe/dselect_k_moe.py`` (commit ccc94ce348360ddcd41c749d4088d468ccfd1eaf),
which it imports from the path given; no reference code is copied here. Provenance and the keys:
tests/data/dselect_k_reference.md.

Environment (Python 3.11, CPU):

    python3.11 -m venv /tmp/venv-tf
    /tmp/venv-tf/bin/pip install tensorflow-cpu==2.21.0 tf-keras==2.21.0   # the code is for Keras 2
    /tmp/venv-tf/bin/pip install numpy==1.26.4 ml-dtypes==0.5.4             # and for numpy 1 (below)
    # dselect_k_moe/dselect_k_moe.py of google-research/google-research at the commit above,
    # saved as /tmp/refs/dselect_k_moe.py

Run from the repository root:

    TF_USE_LEGACY_KERAS=1 /tmp/venv-tf/bin/python tests/data/make_dselect_k_reference.py \
        --reference /tmp/refs/dselect_k_moe.py --out tests/data

Keras 3 refuses the official ``EntropyRegularizer`` (its ``assign_add(..., read_value=False)``), and
numpy 2 silently breaks the official binary codes: ``np.array(list("010")).astype(bool)`` parses the
digits under numpy 1 but is all True under numpy 2 (non-empty strings), which makes every expert's
code all ones.

Per case: numpy's ``default_rng(seed)`` draws the routing inputs ``x`` (tokens, dim), then the gate's
variables (z kernel and bias N(0, z_std), w kernel and bias N(0, 1); task-only: z (k, 1, bits) and w
(k, 1)), which are assigned to the built ``DSelectKGate``; then the upstream gradient ``g`` (tokens,
experts). Stored: the expert weights and selector outputs, the gradient of ``sum(weights * g)`` at x
(example-conditioned) or at z and w (task-only), and the two regularisers as the gate adds them in
training (``EntropyRegularizer`` with a constant coefficient 1, and the unreachable-code term).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np
import tensorflow as tf

# name: (seed, tokens, dim, experts, k, gamma, z_std, example-conditioned)
CASES = {
    "example_e8_k2": (0, 9, 5, 8, 2, 1.0, 0.6, True),
    "example_e5_k3": (1, 7, 4, 5, 3, 1.0, 0.6, True),
    "example_e6_k2_gamma0.5": (2, 6, 4, 6, 2, 0.5, 0.3, True),
    "task_e8_k2": (3, 1, 1, 8, 2, 1.0, 0.6, False),
    "task_e7_k4_gamma2": (4, 1, 1, 7, 4, 2.0, 1.2, False),
}


def load(path: Path):
    spec = importlib.util.spec_from_file_location("dselect_k_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="the official dselect_k_moe.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    ref = load(args.reference)
    arrays, meta = {}, {}
    for name, (seed, tokens, dim, experts, k, gamma, z_std, example) in CASES.items():
        rng = np.random.default_rng(seed)
        bits = int(np.ceil(np.log2(experts)))
        gate = ref.DSelectKGate(num_nonzeros=k, gamma=gamma,
                                entropy_reg=ref.EntropyRegularizer(schedule_fn=lambda _: 1.0))
        expert_outputs = [tf.zeros((tokens, 1)) for _ in range(experts)]
        x = rng.standard_normal((tokens, dim)).astype(np.float32)
        if example:
            gate((expert_outputs, tf.constant(x)))  # builds the Dense layers
            z_kernel = (z_std * rng.standard_normal((dim, k * bits))).astype(np.float32)
            z_bias = (z_std * rng.standard_normal(k * bits)).astype(np.float32)
            w_kernel = rng.standard_normal((dim, k)).astype(np.float32)
            w_bias = rng.standard_normal(k).astype(np.float32)
            gate._z_logits.kernel.assign(z_kernel)
            gate._z_logits.bias.assign(z_bias)
            gate._w_logits.kernel.assign(w_kernel)
            gate._w_logits.bias.assign(w_bias)
            arrays.update({f"{name}/x": x, f"{name}/z_kernel": z_kernel, f"{name}/z_bias": z_bias,
                           f"{name}/w_kernel": w_kernel, f"{name}/w_bias": w_bias})
        else:
            gate(expert_outputs)
            z = (z_std * rng.standard_normal((k, 1, bits))).astype(np.float32)
            w = rng.standard_normal((k, 1)).astype(np.float32)
            gate._z_logits.assign(z)
            gate._w_logits.assign(w)
            arrays.update({f"{name}/z": z, f"{name}/w": w})
        g = rng.standard_normal((tokens, experts)).astype(np.float32)
        xt = tf.constant(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(xt)
            if example:
                weights, selectors = gate._compute_example_conditioned_expert_weights(xt)
            else:
                weights, selectors = gate._compute_expert_weights()
            objective = tf.reduce_sum(tf.reshape(weights, (-1, experts)) * g)
        if example:
            arrays[f"{name}/x_grad"] = tape.gradient(objective, xt).numpy()
        else:
            arrays[f"{name}/z_grad"] = tape.gradient(objective, gate._z_logits).numpy()
            arrays[f"{name}/w_grad"] = tape.gradient(objective, gate._w_logits).numpy()
        gate((expert_outputs, xt) if example else expert_outputs, training=True)
        losses = [float(v) for v in gate.losses]
        arrays.update({f"{name}/g": g, f"{name}/weights": weights.numpy(), f"{name}/selectors": selectors.numpy(),
                       f"{name}/entropy": np.float32(losses[0])})
        if experts != 2 ** bits:
            arrays[f"{name}/unreachable"] = np.float32(losses[1])
        meta[name] = {"seed": seed, "tokens": tokens, "dim": dim, "experts": experts, "k": k, "gamma": gamma,
                      "example_conditioned": example}
    meta["_tensorflow"] = tf.__version__
    np.savez(args.out / "dselect_k_reference.npz", meta=np.array(json.dumps(meta)), **arrays)


if __name__ == "__main__":
    main()
