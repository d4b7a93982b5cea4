#!/usr/bin/env python3
"""A small real model of exactly the Qwen3.5-MoE architecture, trained from scratch.

Two steps, deterministic given the seeds:

  prepare (CPU, any machine with `tokenizers`): the corpus is the Python 3.11 standard
  library's modules and packages without their tests (source and docstrings: text that
  exists on a fresh machine, 14 MB), split by file into train (95%) and held-out (5%); a
  byte-level BPE tokenizer of 2048 ids is trained on the train split.

      python3 tools/train_small_model.py prepare --out train-data

  train (one GPU, a few minutes; PyTorch + transformers): a Qwen3_5MoeForCausalLM with 4
  layers (3 Gated DeltaNet + 1 gated attention), hidden 192, 16 experts of width 128 with 4
  routed per token plus a shared expert, trained on 256-token windows with the load-balancing
  loss. Writes an HF checkpoint (bf16), the tokenizer with a ChatML template, the loss curve,
  and the held-out perplexity computed by transformers in float32 (the cross-check of
  `flash-moe eval`: 256-token windows, each scored on its own).

      python3 tools/train_small_model.py train --data train-data --out model --steps 1500

  export (CPU): rewrites the trained checkpoint in the layout of the real Qwen/Qwen3.5
  repos (a qwen3_5_moe config with text_config, weights under model.language_model., fused
  experts), which transformers, mlx-lm and flash-moe all load.

      python3 tools/train_small_model.py export --src model --out model-hf

The exact commands used for the bundled model are in models/README.md.
"""

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

WINDOW = 256
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def prepare(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages"}
    files = sorted(f for f in stdlib.rglob("*.py") if not skip & set(f.relative_to(stdlib).parts))
    rng = random.Random(0)
    held = set(rng.sample(range(len(files)), max(1, len(files) // 20)))
    train = [f.read_text(errors="replace") for i, f in enumerate(files) if i not in held]
    heldout = [f.read_text(errors="replace") for i, f in enumerate(files) if i in held]
    out.mkdir(parents=True, exist_ok=True)
    sep = "\n<|endoftext|>\n"
    (out / "train.txt").write_text(sep.join(train))
    (out / "heldout.txt").write_text(sep.join(heldout))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(train, trainer)
    tok.save(str(out / "tokenizer.json"))
    print(f"{len(train)} train files ({sum(map(len, train)) / 1e6:.1f} MB), {len(heldout)} held out "
          f"({sum(map(len, heldout)) / 1e3:.0f} KB)")


def windows(ids, n):
    return [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]


def train(data: Path, out: Path, steps: int, seed: int, batch: int, max_seconds: float):
    import torch
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    random.seed(seed)
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    train_ids = tok.encode((data / "train.txt").read_text()).ids
    held_ids = tok.encode((data / "heldout.txt").read_text()).ids
    print(f"train tokens {len(train_ids)}, held-out tokens {len(held_ids)}")
    config = Qwen3_5MoeTextConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=192, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["full_attention"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=48, linear_value_head_dim=48,
        linear_conv_kernel_dim=4, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128,
        shared_expert_intermediate_size=256, rms_norm_eps=1e-6, max_position_embeddings=4096,
        tie_word_embeddings=False, router_aux_loss_coef=0.01, output_router_logits=True,
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 1.0e6, "partial_rotary_factor": 0.25},
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters {params / 1e6:.2f}M")
    data_t = torch.tensor(train_ids, dtype=torch.long)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    log = []
    start = time.time()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(train_ids) - WINDOW - 1, (batch,), generator=gen)
        x = torch.stack([data_t[s:s + WINDOW] for s in starts]).to(device)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        last = step == steps - 1 or time.time() - start > max_seconds
        if step % 25 == 0 or last:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - start, 1)})
            print(log[-1], flush=True)
        if last:
            break
    model.eval()
    model.config.output_router_logits = False
    # Held-out perplexity in float32 on the bf16-rounded weights that are saved.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
        nll, count = 0.0, 0
        for w in windows(held_ids, WINDOW):
            ids = torch.tensor([w], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += len(w) - 1
    ppl = math.exp(nll / count)
    print(f"held-out perplexity (transformers, f32): {ppl:.4f} over {count} predictions")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=1))
    (out / "train_log.json").write_text(json.dumps({
        "command": f"train --steps {steps} --seed {seed} --batch {batch} --max-seconds {max_seconds}", "parameters": params, "window": WINDOW, "batch": batch,
        "train_tokens": len(train_ids), "heldout_tokens": len(held_ids), "heldout_predictions": count,
        "heldout_perplexity_transformers_f32": ppl, "transformers": transformers.__version__,
        "torch": torch.__version__, "log": log}, indent=1))


def export(src: Path, out: Path):
    import shutil
    import sys

    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).parent))
    from make_fixtures import save_vlm_layout

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    save_vlm_layout(model, out, torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json", "train_log.json"):
        shutil.copy(src / name, out / name)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["eos_token_id"] = model.config.eos_token_id
    (out / "config.json").write_text(json.dumps(config, indent=2))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--out", type=Path, required=True)
    b = sub.add_parser("train")
    b.add_argument("--data", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--steps", type=int, default=1500)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--batch", type=int, default=64)
    b.add_argument("--max-seconds", type=float, default=float("inf"), help="stop early after this long")
    c = sub.add_parser("export")
    c.add_argument("--src", type=Path, required=True)
    c.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "prepare":
        prepare(args.out)
    elif args.cmd == "export":
        export(args.src, args.out)
    else:
        train(args.data, args.out, args.steps, args.seed, args.batch, args.max_seconds)


if __name__ == "__main__":
    main()
