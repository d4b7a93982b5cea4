#!/usr/bin/env python3
"""Builds the tiny reference models in tests/fixtures/ and their reference logits.

Every fixture is a model directory the engine loads as is, plus `reference.json` (the token
ids, the prefill split, the tool versions) and two logits files written by the outside
implementation that owns the layout:

  reference-full.npy            all ids in one batch            -> `flash-moe logits`
  reference-prefill-decode.npy  `prefill` ids, then one at a time -> `flash-moe logits --prefill N`

HF layouts are checked against Hugging Face transformers, MLX layouts against mlx-lm; a
checkpoint is never compared with the other implementation (mlx_lm.convert rounds 1 + w of
the norms to the checkpoint dtype, which moves logits by more than the test tolerance).
References are computed in float32 on exactly the weights stored in the checkpoint: bf16
weights are upcast, never recomputed in bf16.

Weights are re-randomised to a realistic scale (the default 0.02 init gives near-identical
logits for every token) and norms are made non-zero so the (1 + w) convention is exercised.

Usage (CPU only, about a minute):
  python3 -m venv /tmp/fx && /tmp/fx/bin/pip install "transformers==5.23.0" torch \
      "mlx[cpu]==0.32.4" "mlx-lm==0.32.2" safetensors numpy tokenizers
  /tmp/fx/bin/python tools/make_fixtures.py [--out tests/fixtures]
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import transformers
from transformers import AutoModelForCausalLM, Qwen3_5MoeTextConfig, Qwen3NextConfig
from transformers.cache_utils import DynamicCache

SEQ_LEN = 72  # more than one 64-token chunk of transformers' chunked delta rule
PREFILL = 29

# ---------------------------------------------------------------------------------------------
# Model definitions


def qwen35_config(**overrides):
    base = dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # rotary dim 8 with the 0.25 partial factor
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1.0e7,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    base.update(overrides)
    return Qwen3_5MoeTextConfig(**base)


def qwen3next_config(**overrides):
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        full_attention_interval=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,  # two value heads per key head: exercises the per-group packing
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_theta=1.0e7,
        partial_rotary_factor=0.25,
    )
    base.update(overrides)
    return Qwen3NextConfig(**base)


def real_qwen3next_config(path, interval):
    """Rewrites a Qwen3-Next config.json the way the real Qwen/Qwen3-Next-80B-A3B files are:
    rope_theta and partial_rotary_factor at the top level, full_attention_interval instead
    of layer_types (mlx-lm reads only the interval)."""
    cfg = json.loads((path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    cfg.pop("layer_types")
    cfg["full_attention_interval"] = interval
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


def build(config, seed):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.05, 1.0).log())
            elif name.endswith("dt_bias"):
                p.normal_(0.0, 0.5)
            elif name.endswith("linear_attn.norm.weight"):
                p.normal_(1.0, 0.2)  # the gated norm: a plain multiplier
            elif p.ndim == 1:
                p.normal_(0.0, 0.2)  # zero-centred norms, applied as 1 + w
            elif name.endswith("embed_tokens.weight"):
                p.normal_(0.0, 1.0)
            elif name.endswith("lm_head.weight"):
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.15)
    return model


def round_to(model, dtype):
    """Rounds every weight to `dtype` in place (kept in float32 for the reference)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


# ---------------------------------------------------------------------------------------------
# Checkpoint writers


def save_vlm_layout(model, out, dtype):
    """The layout of the real Qwen/Qwen3.5-*-A*B repos: keys under model.language_model.,
    fused experts, a qwen3_5_moe config with the text fields under text_config."""
    out.mkdir(parents=True)
    tensors = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if key.startswith("model."):
            key = "model.language_model." + key[len("model.") :]
        tensors[key] = value.to(dtype).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    text = model.config.to_dict()
    text["model_type"] = "qwen3_5_moe_text"
    # The real configs carry both; mlx-lm reads only the interval.
    types = text["layer_types"]
    for n in range(1, len(types) + 1):
        if all((t == "full_attention") == ((i + 1) % n == 0) for i, t in enumerate(types)):
            text["full_attention_interval"] = n
            break
    config = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": {"model_type": "qwen3_5_moe_vision", "depth": 1},
        "tie_word_embeddings": False,
        "transformers_version": transformers.__version__,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------
# References


def token_ids(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, SEQ_LEN), generator=g)


def hf_reference(model, ids):
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits[0]
        cache = DynamicCache(config=model.config)
        pre = model(input_ids=ids[:, :PREFILL], past_key_values=cache, use_cache=True).logits[0]
        steps = [
            model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[0, -1]
            for t in range(PREFILL, SEQ_LEN)
        ]
    mixed = torch.cat([pre, torch.stack(steps)], 0)
    return full.numpy(), mixed.numpy()


def mlx_reference(path, ids):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    model.set_dtype(mx.float32)  # f32 compute on exactly the stored values (scales included)
    x = mx.array(ids.numpy())
    full = model(x)[0]
    cache = make_prompt_cache(model)
    pre = model(x[:, :PREFILL], cache=cache)[0]
    steps = [model(x[:, t : t + 1], cache=cache)[0, -1] for t in range(PREFILL, SEQ_LEN)]
    mixed = mx.concatenate([pre, mx.stack(steps)], 0)
    mx.eval(full, mixed)
    return np.array(full, dtype=np.float32), np.array(mixed, dtype=np.float32)


def write_reference(out, ids, full, mixed, source, notes):
    np.save(out / "reference-full.npy", full.astype(np.float32))
    np.save(out / "reference-prefill-decode.npy", mixed.astype(np.float32))
    gap = float(np.abs(full - mixed).max())
    meta = {
        "ids": ids[0].tolist(),
        "prefill": PREFILL,
        "reference": source,
        "versions": versions(),
        "notes": notes,
        "max_abs_gap_between_reference_paths": gap,
    }
    (out / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  {out.name}: {source}, logits {full.shape}, batched vs prefill+decode gap {gap:.2e}")


def versions():
    import mlx.core as mx
    import mlx_lm

    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
    }


def mlx_convert(src, out, dtype, **quant):
    """mlx_lm.convert, keeping only the model files (it also writes a README and, from
    transformers' defaults, tokenizer files); the source's own tokenizer files are kept."""
    from mlx_lm import convert

    convert(str(src), str(out), quantize=True, dtype=dtype, **quant)
    for name in ("README.md", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (out / name).unlink(missing_ok=True)
        if (src / name).exists():
            shutil.copy(src / name, out / name)


# ---------------------------------------------------------------------------------------------
# Fixtures


def hf_qwen35_f32_per_expert(root):
    """transformers' save_pretrained: per-expert keys under model., f32, a bare
    qwen3_5_moe_text config with a non-periodic layer_types."""
    out = root / "hf-qwen35-f32-per-expert"
    types = ["linear_attention", "full_attention", "linear_attention", "linear_attention", "full_attention"]
    config = qwen35_config(num_hidden_layers=5, layer_types=types, num_experts=6, moe_intermediate_size=16)
    model = build(config, seed=11)
    model.save_pretrained(out)
    ids = token_ids(256, 101)
    write_reference(out, ids, *hf_reference(model, ids), "transformers", "non-periodic layer_types; GQA 4:2; 4 value heads over 2 key heads")


def hf_qwen35_bf16_fused(root):
    """The real Qwen3.5 repo layout: fused experts under model.language_model., bf16, with a
    single KV head."""
    out = root / "hf-qwen35-bf16-fused"
    config = qwen35_config(
        num_key_value_heads=1,
        linear_num_value_heads=2,
        num_experts_per_tok=3,
        layer_types=None,
        full_attention_interval=2,
    )
    model = build(config, seed=12)
    round_to(model, torch.bfloat16)
    save_vlm_layout(model, out, torch.bfloat16)
    ids = token_ids(256, 102)
    write_reference(out, ids, *hf_reference(model, ids), "transformers", "bf16 weights, reference in f32 on the same values; one KV head")


def hf_qwen3next_sharded(root):
    """Qwen3-Next as transformers saves it (per-expert keys, fused in_proj_qkvz/in_proj_ba),
    sharded with an index, with one dense-MLP layer and top-k weights not renormalised."""
    out = root / "hf-qwen3next-f32-sharded"
    config = qwen3next_config(norm_topk_prob=False, mlp_only_layers=[1], num_experts=6, moe_intermediate_size=16)
    model = build(config, seed=13)
    model.save_pretrained(out, max_shard_size="300KB")
    real_qwen3next_config(out, 2)
    ids = token_ids(256, 103)
    write_reference(out, ids, *hf_reference(model, ids), "transformers", "sharded; dense layer 1; norm_topk_prob false")
    # What `flash-moe convert --expert-bits 4 --dense-bits 4` must reproduce: mlx-lm's own
    # 4-bit conversion of this checkpoint (f32, so both sides quantize the same values).
    with tempfile.TemporaryDirectory() as tmp:
        q4 = Path(tmp) / "q4"
        mlx_convert(out, q4, "float32", q_bits=4, q_group_size=64)
        full, _ = mlx_reference(q4, ids)
    np.save(out / "reference-mlx-q4-full.npy", full)
    print(f"  {out.name}: + mlx-lm logits of its own 4-bit conversion")


def mlx_qwen35(root, name, seed, dtype, tokenizer=None, **quant):
    """mlx_lm.convert of a real-layout HF checkpoint."""
    out = root / name
    config = qwen35_config(
        vocab_size=320 if tokenizer else 256,
        moe_intermediate_size=64,  # mlx quantizes only inputs divisible by the group size
        shared_expert_intermediate_size=64,
        layer_types=None,
        full_attention_interval=4,
    )
    model = build(config, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        save_vlm_layout(model, src, torch.float32)
        if tokenizer:
            tokenizer(src)
        mlx_convert(src, out, dtype, **quant)
    ids = token_ids(config.vocab_size, seed + 90)
    write_reference(out, ids, *mlx_reference(out, ids), "mlx-lm", f"mlx_lm.convert dtype={dtype} {quant}")


def mlx_qwen3next(root):
    out = root / "mlx-qwen3next-4bit-f16"
    config = qwen3next_config(moe_intermediate_size=64, shared_expert_intermediate_size=64, intermediate_size=128)
    model = build(config, seed=16)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        model.save_pretrained(src)
        real_qwen3next_config(src, 2)
        mlx_convert(src, out, "float16", q_bits=4, q_group_size=64)
    ids = token_ids(256, 106)
    write_reference(out, ids, *mlx_reference(out, ids), "mlx-lm", "float16 scales; quantized in_proj_qkvz / in_proj_ba")


def quantization_table(root):
    """mx.quantize / mx.dequantize of one matrix at every bit width and a few group sizes."""
    import mlx.core as mx
    from safetensors.numpy import save_file as save_np

    out = root / "mlx-affine-dequant"
    out.mkdir(parents=True)
    rng = np.random.default_rng(5)
    w = rng.normal(0, 1, (6, 256)).astype(np.float32)
    tensors = {"source": w}
    for bits in (2, 3, 4, 5, 6, 8):
        for group in (32, 64, 128):
            q, scales, biases = mx.quantize(mx.array(w), group_size=group, bits=bits)
            deq = mx.dequantize(q, scales, biases, group_size=group, bits=bits)
            key = f"b{bits}_g{group}"
            tensors[f"{key}.weight"] = np.array(q)
            tensors[f"{key}.scales"] = np.array(scales)
            tensors[f"{key}.biases"] = np.array(biases)
            tensors[f"{key}.dequantized"] = np.array(deq)
    save_np(tensors, str(out / "table.safetensors"))
    print(f"  {out.name}: mx.quantize at 2/3/4/5/6/8 bits, groups 32/64/128")


def demo_tokenizer(dest):
    """A byte-level BPE of 320 ids trained on the Python standard library's docs."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [p.read_text(errors="ignore") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    cfg = json.loads((dest / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = tok.token_to_id("<|endoftext|>")
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))


def tokenizer_reference(root):
    """Ids from Python `tokenizers` for a few strings, for the `tokenize` command."""
    from tokenizers import Tokenizer

    model = root / "mlx-qwen35-4bit"
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    texts = ["def main():\n    return 0\n", "Hello, world!", "  spaces\tand\ttabs  ", "<|im_start|>user\nhi<|im_end|>", "naïve café 日本"]
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in texts]
    (model / "tokenizer-reference.json").write_text(json.dumps(cases, indent=2, ensure_ascii=False) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="tests/fixtures")
    args = parser.parse_args()
    root = Path(args.out)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    torch.set_num_threads(2)
    hf_qwen35_f32_per_expert(root)
    hf_qwen35_bf16_fused(root)
    hf_qwen3next_sharded(root)
    mlx_qwen35(root, "mlx-qwen35-4bit", seed=14, dtype="bfloat16", tokenizer=demo_tokenizer, q_bits=4, q_group_size=64)
    mlx_qwen35(root, "mlx-qwen35-mixed-2-6", seed=15, dtype="bfloat16", quant_predicate="mixed_2_6", q_group_size=64)
    mlx_qwen3next(root)
    quantization_table(root)
    tokenizer_reference(root)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB in {root}")


if __name__ == "__main__":
    main()
