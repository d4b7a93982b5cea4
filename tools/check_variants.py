#!/usr/bin/env python3
"""Checks `flash-moe logits` on checkpoints it has never seen: other sizes, head counts,
expert counts, dtypes, bit widths, group sizes and tied embeddings, in every layout, against
transformers or mlx-lm. Nothing is written to the repository.

Usage (same Python environment as tools/make_fixtures.py, binary built first):
  cargo build --release
  /tmp/fx/bin/python tools/check_variants.py [--binary target/release/flash-moe]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import make_fixtures as fx  # noqa: E402

VARIANTS = [
    # (name, builder)
    (
        "hf qwen3.5 f16, tied embeddings, dk != dv, 8 heads over 4 kv, 16 experts top-4",
        lambda root: hf(
            root,
            fx.qwen35_config(
                hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
                linear_value_head_dim=16, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=48,
                shared_expert_intermediate_size=96, tie_word_embeddings=True, layer_types=None,
                full_attention_interval=3, num_hidden_layers=6,
            ),
            torch.float16,
            vlm=False,
        ),
    ),
    (
        "hf qwen3.5 bf16 real layout, partial rotary 0.5, theta 1e6",
        lambda root: hf(
            root,
            fx.qwen35_config(
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5},
                num_experts=12, num_experts_per_tok=5, layer_types=None, full_attention_interval=2,
            ),
            torch.bfloat16,
            vlm=True,
        ),
    ),
    (
        "hf qwen3-next bf16, 3 value heads per key head, dense layers by decoder_sparse_step",
        lambda root: hf(
            root,
            fx.qwen3next_config(
                hidden_size=96, linear_num_key_heads=2, linear_num_value_heads=6, linear_key_head_dim=24,
                linear_value_head_dim=32, num_experts=10, num_experts_per_tok=3, decoder_sparse_step=2,
            ),
            torch.bfloat16,
            vlm=False,
            qwen3next=True,
        ),
    ),
    (
        "mlx qwen3.5 3-bit group 32, tied embeddings",
        lambda root: mlx(root, fx.qwen35_config(
            moe_intermediate_size=64, shared_expert_intermediate_size=64, tie_word_embeddings=True,
            layer_types=None, full_attention_interval=2), "bfloat16", q_bits=3, q_group_size=32),
    ),
    (
        "mlx qwen3.5 8-bit group 128, f32",
        lambda root: mlx(root, fx.qwen35_config(
            hidden_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=128,
            num_attention_heads=4, head_dim=32, linear_num_value_heads=8, layer_types=None,
            full_attention_interval=4, num_hidden_layers=4), "float32", q_bits=8, q_group_size=128),
    ),
    (
        "mlx qwen3.5 5-bit, 6 experts top-6",
        lambda root: mlx(root, fx.qwen35_config(
            moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=6, num_experts_per_tok=6,
            layer_types=None, full_attention_interval=4), "bfloat16", q_bits=5, q_group_size=64),
    ),
    (
        "mlx qwen3-next mixed_3_6",
        lambda root: mlx(root, fx.qwen3next_config(
            moe_intermediate_size=64, shared_expert_intermediate_size=64, intermediate_size=128),
            "bfloat16", quant_predicate="mixed_3_6", q_group_size=64),
    ),
]


def hf(root, config, dtype, vlm, qwen3next=False):
    model = fx.build(config, seed=7)
    fx.round_to(model, dtype)
    out = root / "model"
    if vlm:
        fx.save_vlm_layout(model, out, dtype)
    else:
        # Converting the model itself would also round its rotary inv_freq buffer.
        model.save_pretrained(out, state_dict={k: v.to(dtype) for k, v in model.state_dict().items()})
        if qwen3next:
            fx.real_qwen3next_config(out, 2)
    ids = fx.token_ids(config.vocab_size, 3)
    return out, ids, fx.hf_reference(model, ids)


def mlx(root, config, dtype, **quant):
    model = fx.build(config, seed=8)
    src = root / "src"
    if config.model_type == "qwen3_next":
        model.save_pretrained(src)
        fx.real_qwen3next_config(src, 2)
    else:
        fx.save_vlm_layout(model, src, torch.float32)
    out = root / "model"
    fx.mlx_convert(src, out, dtype, **quant)
    ids = fx.token_ids(config.vocab_size, 4)
    return out, ids, fx.mlx_reference(out, ids)


def run_logits(binary, model, ids, prefill, out):
    args = [binary, "logits", "--model", str(model), "--ids", ",".join(map(str, ids[0].tolist())), "--out", str(out)]
    if prefill:
        args += ["--prefill", str(prefill)]
    subprocess.run(args, check=True)
    return np.load(out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", default="target/release/flash-moe")
    args = parser.parse_args()
    failures = 0
    for name, builder in VARIANTS:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            model, ids, (full, mixed) = builder(root)
            for label, ref, prefill in [("batch", full, None), ("prefill+decode", mixed, fx.PREFILL)]:
                ours = run_logits(args.binary, model, ids, prefill, root / "out.npy")
                rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
                same = bool((ours.argmax(-1) == ref.argmax(-1)).all())
                ok = rel < 1e-4 and same
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {name} [{label}]: relative L2 {rel:.2e}, argmax {'identical' if same else 'DIFFERS'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
