"""Generate tests/data/vmoe_reference.npz from the public V-MoE reference code.

CI never runs this script: it needs JAX and a vmoe checkout. It imports vmoe; no vmoe code is
copied here. Provenance and the key scheme: tests/data/vmoe_reference.md.

Environment (Python 3.11, CPU):

    python3.11 -m venv /work/venvs/fx-vmoe
    /work/venvs/fx-vmoe/bin/pip install jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 numpy==2.4.6 absl-py
    git clone https://github.com/google-research/vmoe /work/refs/vmoe
    git -C /work/refs/vmoe checkout 942a78bc81d2e63199f0933733582ddae0715416

Run from the repository root:

    /work/venvs/fx-vmoe/bin/python tests/data/make_vmoe_reference.py \
        --vmoe /work/refs/vmoe --out tests/data/vmoe_reference.npz

Inputs come from four numpy streams, one per section (`np.random.default_rng` with seeds 1234
dispatch, 5678 losses, 91011 router, 121314 soft router), drawn in the order this script draws them;
changing the order of the cases below changes every array after it.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np

VMOE_COMMIT = "942a78bc81d2e63199f0933733582ddae0715416"

# vmoe's own golden gates (vmoe/moe_test.py) and hand-made ties: lax.top_k and the stable BPR sort
# must both break them towards the lower index.
VMOE_TEST_GATES = [[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]]
TIED_GATES = [
    [0.25, 0.25, 0.25, 0.25],
    [0.4, 0.4, 0.1, 0.1],
    [0.4, 0.1, 0.4, 0.1],
    [0.1, 0.4, 0.4, 0.1],
    [0.3, 0.3, 0.2, 0.2],
    [0.4, 0.2, 0.2, 0.2],
]

# Random dispatch gates, one array per (G, S, E), drawn in this order; cases with the same shape
# share it, so vanilla and BPR routing see the same gates.
DISPATCH_GATE_SHAPES = [(2, 7, 4), (2, 16, 8), (1, 33, 8), (2, 33, 4), (2, 16, 3), (1, 3, 3),
                        (2, 16, 4), (1, 7, 4)]

# (desc, gates (a (G, S, E) shape or a fixed list), k, batch_priority, dispatcher capacity kwargs).
DISPATCH_CASES = [
    ("vmoe_test_golden_vanilla", VMOE_TEST_GATES, 2, False, {"capacity": 2}),
    ("vmoe_test_golden_bpr", VMOE_TEST_GATES, 2, True, {"capacity": 2}),
    ("G1_S7_E4_k1_cap1", (1, 7, 4), 1, False, {"capacity": 1}),
    ("G2_S7_E4_k2_cap2_bpr", (2, 7, 4), 2, True, {"capacity": 2}),
    ("G2_S16_E8_k2_cap3", (2, 16, 8), 2, False, {"capacity": 3}),
    ("G2_S16_E8_k2_cap3_bpr", (2, 16, 8), 2, True, {"capacity": 3}),
    ("G1_S33_E8_k3_cap6", (1, 33, 8), 3, False, {"capacity": 6}),
    ("G1_S33_E8_k3_cap6_bpr", (1, 33, 8), 3, True, {"capacity": 6}),
    ("G2_S33_E4_k1_cap5_bpr", (2, 33, 4), 1, True, {"capacity": 5}),
    ("G2_S16_E3_k3_cap16_nodrop", (2, 16, 3), 3, False, {"capacity": 16}),
    ("G1_S3_E3_k1_cap1_bpr", (1, 3, 3), 1, True, {"capacity": 1}),
    ("G2_S16_E4_k2_cap4", (2, 16, 4), 2, False, {"capacity": 4}),
    ("ties_G1_S6_E4_k2_cap2", TIED_GATES, 2, False, {"capacity": 2}),
    ("ties_G1_S6_E4_k2_cap2_bpr", TIED_GATES, 2, True, {"capacity": 2}),
    ("cf_G2_S16_E8_k2_cf1.0_ceil_m4", (2, 16, 8), 2, False, {"capacity_factor": 1.0}),
    ("cf_G1_S33_E8_k2_cf1.05_ceil_m4_bpr", (1, 33, 8), 2, True,
     {"capacity_factor": 1.05, "capacity_ceil_or_round": "ceil", "capacity_multiple_of": 4}),
    ("cf_G2_S33_E4_k1_cf0.5_round_m1", (2, 33, 4), 1, False,
     {"capacity_factor": 0.5, "capacity_ceil_or_round": "round", "capacity_multiple_of": 1}),
    ("cf_G2_S7_E4_k2_cf1.25_ceil_mNone", (2, 7, 4), 2, False,
     {"capacity_factor": 1.25, "capacity_ceil_or_round": "ceil", "capacity_multiple_of": None}),
    ("cf_G2_S16_E3_k1_cf0.6_round_m2_bpr", (2, 16, 3), 1, True,
     {"capacity_factor": 0.6, "capacity_ceil_or_round": "round", "capacity_multiple_of": 2}),
]

# compute_capacity rows: (num_tokens, num_experts, capacity_factor, ceil_or_round, multiple_of);
# None and 0 both mean "no rounding" and are kept apart on purpose.
CAPACITY_CASES = [
    (64, 32, 1.0, "ceil", 4), (128, 32, 2.0, "ceil", 4), (66, 8, 1.05, "ceil", 4),
    (66, 8, 1.05, "round", 4), (66, 8, 1.05, "ceil", None), (66, 8, 1.05, "round", 1),
    (5, 2, 1.0, "round", 1), (7, 2, 1.0, "round", 1), (9, 2, 1.0, "round", 0),
    (5, 2, 1.0, "ceil", 1), (3, 1, 2.0, "ceil", 4), (2, 2, 1.0, "ceil", 4),
    (16, 3, 0.6, "round", 2), (16, 3, 0.6, "ceil", 3), (1576, 32, 1.05, "ceil", 4),
    (3152, 32, 1.5, "round", 8), (10, 4, 1.5, "round", 1), (196, 128, 1.0, "round", 1),
    (100, 8, 0.01, "ceil", 4),
]
CAPACITY_RAISES = [(128, 32, -1.0, "ceil", 4), (100, 8, 0.01, "round", 4), (3, 8, 1.0, "round", 1)]

# Importance/GShard cases: a fixed (1, 4, 3) array, then random (G, S, E) gates.
LOSS_FIXED_GATES = [[[0.5, 0.4, 0.1], [0.3, 0.3, 0.4], [0.1, 0.2, 0.7], [0.8, 0.2, 0.0]]]
LOSS_GATE_SHAPES = [(1, 16, 8), (3, 7, 4), (3, 33, 8), (1, 5, 32), (3, 12, 3)]
# Load-loss case00 is vmoe's routing_test example (noisy = logits + noise in float32) with
# noise_std passed directly (0.1); the random cases give the router's noise_std, which the router
# divides by E before the loss.
LOAD_FIXED = {
    "logits": [[[0.9, 0.06, 0.04], [0.7, 0.18, 0.12], [0.85, 0.05, 0.1]]],
    "noise": [[[-0.037, 0.026, -0.018], [-0.074, 0.045, -0.015], [-0.067, -0.059, 0.073]]],
    "k": 2,
    "noise_std": 0.1,
}
# (G, S, E, k, router noise_std).
LOAD_CASES = [(1, 16, 8, 2, 1.0), (3, 7, 4, 1, 1.0), (3, 33, 8, 3, 1.0), (1, 12, 6, 2, 2.0),
              (3, 10, 4, 4, 1.0)]
LOAD_LOGIT_SCALE = 0.3

# (G, S, D, E, k, batch_priority, dispatcher capacity kwargs, loss weights (gshard, importance, load)).
ROUTER_CASES = [
    (1, 8, 6, 4, 2, False, {"capacity": 3}, (0.0, 1.0, 1.0)),
    (2, 16, 8, 8, 2, False, {"capacity_factor": 1.0}, (0.0, 1.0, 1.0)),
    (2, 16, 8, 8, 2, True, {"capacity_factor": 1.0}, (0.01, 0.005, 0.005)),
    (3, 7, 5, 4, 1, True, {"capacity": 2}, (0.0, 1.0, 1.0)),
    (2, 33, 12, 8, 3, False,
     {"capacity_factor": 1.05, "capacity_ceil_or_round": "round", "capacity_multiple_of": 1},
     (1.0, 0.0, 1.0)),
]

# (G, M, D, E, num_slots or None, capacity_factor or None, scale). Cases 02/03 have fewer input
# values than mu values, so SoftRouter scales the inputs there and mu elsewhere.
SOFT_CASES = [
    (2, 8, 16, 4, None, 1.0, 1.0),
    (2, 8, 16, 4, None, 1.0, 2.5),
    (1, 4, 8, 4, 3, None, 2.5),
    (1, 4, 8, 4, 3, None, 1.0),
    (1, 8, 8, 4, 2, None, 2.5),
    (3, 10, 6, 4, None, 1.5, 0.7),
    (2, 10, 12, 4, None, 0.5, 3.0),
]

# get_top_experts_per_item_dispatcher's defaults, stored when a case does not pass them.
DEFAULT_CEIL_OR_ROUND = "ceil"
DEFAULT_MULTIPLE_OF = 4


def softmax_f32(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float64, stored as float32 (the gates' exact bits)."""
    shifted = logits - logits.max(-1, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def f64(value) -> np.ndarray:
    """A JAX float32 result as the float64 numpy array the fixture stores."""
    return np.asarray(value).astype(np.float64)


def capacity_kwargs_arrays(kwargs: dict) -> dict[str, np.ndarray]:
    """The stored capacity settings: C given, or the factor with rounding (defaults filled in)."""
    if "capacity" in kwargs:
        return {"capacity_given": np.bool_(True)}
    multiple_of = kwargs.get("capacity_multiple_of", DEFAULT_MULTIPLE_OF)
    return {
        "capacity_factor": np.float64(kwargs["capacity_factor"]),
        "capacity_ceil_or_round": np.str_(kwargs.get("capacity_ceil_or_round",
                                                     DEFAULT_CEIL_OR_ROUND)),
        "capacity_multiple_of": np.int64(0 if multiple_of is None else multiple_of),
        "capacity_given": np.bool_(False),
    }


def dispatch_section(jax, vmoe_moe, out: dict, meta: dict) -> None:
    rng = np.random.default_rng(1234)
    random_gates = {shape: softmax_f32(rng.normal(size=shape)) for shape in DISPATCH_GATE_SHAPES}
    for i, (desc, gates_src, k, bpr, cap) in enumerate(DISPATCH_CASES):
        p = f"dispatch/case{i:02d}/"
        if isinstance(gates_src, tuple):
            gates = random_gates[gates_src]
        else:
            gates = np.asarray([gates_src], dtype=np.float32)
        G, S, E = gates.shape

        def dispatcher(name):
            fn = functools.partial(vmoe_moe.get_top_experts_per_item_dispatcher, name=name,
                                   num_selected_experts=k, batch_priority=bpr, **cap)
            return jax.vmap(fn)(gates)

        einsum = dispatcher("einsum")
        indices = dispatcher("indices")
        combine = np.asarray(einsum.combine_weights)
        mask = np.asarray(einsum.dispatch_weights)
        C = combine.shape[-1]
        settings = capacity_kwargs_arrays(cap)
        out[p + "gates"] = gates
        out[p + "k"] = np.int64(k)
        out[p + "batch_priority"] = np.bool_(bpr)
        out[p + "capacity"] = np.int64(C)
        for key, value in settings.items():
            out[p + key] = value
        out[p + "combine_weights"] = combine
        out[p + "dispatch_mask"] = mask
        out[p + "indices"] = np.asarray(indices.indices)
        out[p + "indices_combine_weights"] = np.asarray(indices.combine_weights)
        meta[p] = {"desc": desc, "G": G, "S": S, "E": E, "k": k, "batch_priority": bpr,
                   "C": C, "num_requested": G * S * k, "num_kept": int(mask.sum()), **cap}


def capacity_section(vmoe_moe, out: dict) -> None:
    def columns(rows):
        n, e, cf, mode, mult = zip(*rows)
        return {
            "num_tokens": np.asarray(n, dtype=np.int64),
            "num_experts": np.asarray(e, dtype=np.int64),
            "capacity_factor": np.asarray(cf, dtype=np.float64),
            "ceil_or_round": np.asarray(mode),
            "multiple_of": np.asarray([m or 0 for m in mult], dtype=np.int64),
        }

    cols = columns(CAPACITY_CASES)
    cols["multiple_of_is_none"] = np.asarray([r[4] is None for r in CAPACITY_CASES])
    cols["result"] = np.asarray([vmoe_moe.compute_capacity(*r) for r in CAPACITY_CASES],
                                dtype=np.int64)
    for key, value in cols.items():
        out["capacity/" + key] = value
    raises = columns(CAPACITY_RAISES)
    flags = []
    for row in CAPACITY_RAISES:
        try:
            vmoe_moe.compute_capacity(*row)
            flags.append(False)
        except ValueError:
            flags.append(True)
    raises["raises_value_error"] = np.asarray(flags)
    for key, value in raises.items():
        out["capacity_raises/" + key] = value


def loss_section(jax, jnp, router_cls, out: dict) -> None:
    rng = np.random.default_rng(5678)
    gate_sets = [np.asarray(LOSS_FIXED_GATES, dtype=np.float32)]
    gate_sets += [softmax_f32(rng.normal(size=shape)) for shape in LOSS_GATE_SHAPES]
    for i, gates in enumerate(gate_sets):
        for name, fn in (("importance", router_cls._importance_auxiliary_loss),
                         ("gshard", router_cls._gshard_auxiliary_loss)):
            p = f"loss/{name}/case{i:02d}/"
            per_group = jax.vmap(fn)(jnp.asarray(gates))
            out[p + "gates"] = gates
            out[p + "loss_per_group"] = f64(per_group)
            out[p + "loss_mean"] = f64(per_group.mean())

    fixed_logits = np.asarray(LOAD_FIXED["logits"], dtype=np.float32)
    fixed_noisy = fixed_logits + np.asarray(LOAD_FIXED["noise"], dtype=np.float32)
    load_sets = [(fixed_logits, fixed_noisy, LOAD_FIXED["k"], np.nan, LOAD_FIXED["noise_std"])]
    for G, S, E, k, noise_cfg in LOAD_CASES:
        noise_std = noise_cfg / E  # what NoisyTopExpertsPerItemRouter passes to the loss
        logits = LOAD_LOGIT_SCALE * rng.normal(size=(G, S, E)).astype(np.float32)
        noisy = logits + (noise_std * rng.normal(size=(G, S, E))).astype(np.float32)
        load_sets.append((logits, noisy, k, noise_cfg, noise_std))
    for i, (logits, noisy, k, noise_cfg, noise_std) in enumerate(load_sets):
        p = f"loss/load/case{i:02d}/"
        fn = functools.partial(router_cls._load_auxiliary_loss, num_selected_experts=k,
                               noise_std=noise_std)
        per_group = jax.vmap(fn)(jnp.asarray(logits), jnp.asarray(noisy))
        out[p + "logits"] = logits
        out[p + "logits_noisy"] = noisy
        out[p + "k"] = np.int64(k)
        out[p + "noise_std_config"] = np.float64(noise_cfg)
        out[p + "noise_std"] = np.float64(noise_std)
        out[p + "loss_per_group"] = f64(per_group)
        out[p + "loss_mean"] = f64(per_group.mean())


def router_section(router_cls, out: dict, meta: dict) -> None:
    rng = np.random.default_rng(91011)
    for i, (G, S, D, E, k, bpr, cap, weights) in enumerate(ROUTER_CASES):
        p = f"router/case{i:02d}/"
        x = rng.normal(size=(G, S, D)).astype(np.float32)
        kernel = rng.normal(size=(D, E)).astype(np.float32)
        gshard_w, importance_w, load_w = weights
        router = router_cls(num_experts=E, num_selected_experts=k, gshard_loss_weight=gshard_w,
                            importance_loss_weight=importance_w, load_loss_weight=load_w,
                            dispatcher={"name": "einsum", "batch_priority": bpr, **cap},
                            deterministic=True)
        (dispatcher, metrics), state = router.apply(
            {"params": {"dense": {"kernel": kernel}}}, x, capture_intermediates=True)
        logits = np.asarray(state["intermediates"]["dense"]["__call__"][0])
        combine = np.asarray(dispatcher.combine_weights)
        out[p + "x"] = x
        out[p + "kernel"] = kernel
        out[p + "num_experts"] = np.int64(E)
        out[p + "k"] = np.int64(k)
        out[p + "batch_priority"] = np.bool_(bpr)
        for key, value in capacity_kwargs_arrays(cap).items():
            out[p + key] = value
        out[p + "gshard_loss_weight"] = np.float64(gshard_w)
        out[p + "importance_loss_weight"] = np.float64(importance_w)
        out[p + "load_loss_weight"] = np.float64(load_w)
        out[p + "capacity"] = np.int64(combine.shape[-1])
        out[p + "logits"] = logits
        out[p + "combine_weights"] = combine
        out[p + "dispatch_mask"] = np.asarray(dispatcher.dispatch_weights)
        for name in sorted(metrics):
            out[p + "metrics/" + name] = f64(metrics[name])
        meta[p] = {
            "G": G, "S": S, "D": D, "E": E, "k": k, "C": int(combine.shape[-1]),
            "dispatcher": {"batch_priority": bpr, **cap},
            "loss_weights": {"gshard_loss_weight": gshard_w,
                             "importance_loss_weight": importance_w,
                             "load_loss_weight": load_w},
            "metrics": {name: list(np.shape(v)) for name, v in metrics.items()},
        }


def soft_section(vmoe_moe, soft_router_cls, out: dict, meta: dict) -> None:
    rng = np.random.default_rng(121314)
    for i, (G, M, D, E, num_slots, cf, scale) in enumerate(SOFT_CASES):
        p = f"soft/case{i:02d}/"
        x = rng.normal(size=(G, M, D)).astype(np.float32)
        router = soft_router_cls(num_experts=E, num_slots=num_slots, capacity_factor=cf,
                                 noise_std=0.0, deterministic=True)
        # Without num_slots SoftRouter derives P this way; mu must have the shape it will ask for.
        P = num_slots if num_slots is not None else vmoe_moe.compute_capacity(
            M, E, cf, ceil_or_round="round", multiple_of=1)
        mu = rng.normal(size=(D, E, P)).astype(np.float32)
        (dispatcher, metrics), state = router.apply(
            {"params": {"mu": mu, "scale": np.float32(scale)}}, x, mutable=["intermediates"])
        inner = dispatcher.dispatcher  # SoftRouter wraps its EinsumDispatcher in bfloat16 casts
        scaled = "inputs" if x.size < mu.size else "mu"
        out[p + "x"] = x
        out[p + "mu"] = mu
        out[p + "scale"] = np.float32(scale)
        out[p + "num_experts"] = np.int64(E)
        out[p + "num_slots"] = np.int64(P)
        out[p + "num_slots_given"] = np.bool_(num_slots is not None)
        out[p + "capacity_factor"] = np.float64(np.nan if cf is None else cf)
        out[p + "scaled_tensor"] = np.str_(scaled)
        out[p + "mu_unit"] = np.asarray(state["intermediates"]["mu_unit"][0])
        out[p + "dispatch_weights"] = np.asarray(inner.dispatch_weights)
        out[p + "combine_weights"] = np.asarray(inner.combine_weights)
        for name, value in metrics.items():
            out[p + "metrics/" + name] = f64(value)
        meta[p] = {"G": G, "M": M, "D": D, "E": E, "P": P, "capacity_factor": cf,
                   "num_slots_arg": num_slots, "scale": scale, "scaled_tensor": scaled,
                   "x_size": int(x.size), "mu_size": int(mu.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vmoe", type=Path, required=True, help="vmoe checkout at VMOE_COMMIT")
    parser.add_argument("--out", type=Path, default=Path("tests/data/vmoe_reference.npz"))
    args = parser.parse_args()
    sys.path.insert(0, str(args.vmoe))

    import flax
    import jax
    import jax.numpy as jnp
    import vmoe.moe as vmoe_moe
    from vmoe.nn.routing import NoisyTopExpertsPerItemRouter
    from vmoe.projects.soft_moe.router import SoftRouter

    out: dict[str, np.ndarray] = {}
    cases: dict[str, dict] = {}
    dispatch_section(jax, vmoe_moe, out, cases)
    capacity_section(vmoe_moe, out)
    loss_section(jax, jnp, NoisyTopExpertsPerItemRouter, out)
    router_section(NoisyTopExpertsPerItemRouter, out, cases)
    soft_section(vmoe_moe, SoftRouter, out, cases)
    meta = {"cases": cases,
            "provenance": {"jax": jax.__version__, "flax": flax.__version__,
                           "numpy": np.__version__, "platform": jax.default_backend(),
                           "vmoe_commit": VMOE_COMMIT}}
    out["meta"] = np.str_(json.dumps(meta, sort_keys=True))
    np.savez_compressed(args.out, **out)
    print(f"wrote {len(out)} arrays to {args.out}")


if __name__ == "__main__":
    main()
