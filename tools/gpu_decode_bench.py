#!/usr/bin/env python3
"""Decode benchmark for the CUDA backend on synthetic Qwen3.5-397B-shaped models.

Writes a `flash-moe synth` model (as many layers as the disk allows, or --layers), warms the
expert files into host RAM, then runs `flash-moe generate --device cuda` at several K and
VRAM expert-cache caps. For each run it prints tok/s, the measured time per layer and its
60-layer equivalent, the bytes per token served by each tier (VRAM, host RAM, disk), and the
floor those bytes set at the bandwidths measured in the same session (device-to-device copy,
pinned host-to-device copy, cold disk reads). Routing in the synthetic model comes from
random router weights: close to uniform over the experts, the worst case for any cache.

With two depths (`--layers 4,8`) it also prints a closer 60-layer estimate: the time of a
layer from the difference between the depths, the rest as the per-token cost (lm_head,
logits download, sampling), which one depth alone cannot tell apart from the last layer's work.
`--context N` decodes after a prompt of N tokens (the synthetic tokenizer is byte-level), and
the floor then counts the KV cache's bytes each token reads. `--device cpu` runs the script
where there is no GPU (to try it, not to measure).

Standard library only (runs under the GPU machine's python3).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

EXPERT_RECORD = 7_077_888  # bytes of one 4-bit Qwen3.5-397B expert record


def run(cmd, **kw):
    print("$ " + " ".join(map(str, cmd)), flush=True)
    return subprocess.run(list(map(str, cmd)), check=True, text=True, capture_output=True, **kw)


def synth(binary, model, layers, experts):
    if (model / "flash-moe.json").exists():
        return
    if model.exists():
        shutil.rmtree(model)
    cmd = [binary, "synth", "--shape", "qwen3.5-397b-a17b", "--layers", layers, "--to", model]
    if experts:
        cmd += ["--experts", experts]
    run(cmd)


def dense_bytes(binary, model):
    out = run([binary, "inspect", "--model", model]).stdout
    sizes = {}
    for label, value, unit in re.findall(r"^\s+(\S.*?)\s{2,}[\d.]+\w?\s+params\s+([\d.]+) (\w+)", out, re.M):
        scale = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}[unit]
        sizes[label.strip()] = float(value) * scale
    # Per token every dense matrix is read once, except the embedding (one row). The lm_head
    # is read once per token whatever the depth.
    return sum(v for k, v in sizes.items() if k not in ("embedding", "routed experts")), sizes.get("lm_head", 0.0)


def kv_bytes_per_position(model):
    """Bytes of keys and values (f32) one position holds over the model's full-attention layers."""
    c = json.loads((model / "config.json").read_text())
    c = c.get("text_config", c)
    layers = c["num_hidden_layers"]
    kinds = c.get("layer_types") or ["full_attention" if (i + 1) % c["full_attention_interval"] == 0
                                     else "linear_attention" for i in range(layers)]
    return sum(k == "full_attention" for k in kinds) * 2 * c["num_key_value_heads"] * c["head_dim"] * 4


def measure(a, layers, hbm, h2d):
    """Every (K, cap, CPU share) run at one depth: the table's rows, each run's stats, and the model's sizes."""
    work = Path(a.workdir)
    model = work / f"syn397-{layers}l-{a.experts or 512}e"
    synth(a.bin, model, layers, a.experts)
    dense, lm_head = dense_bytes(a.bin, model)
    prompt = ["--prompt", "The"]
    kv_read = 0.0
    if a.context:
        path = work / f"prompt-{a.context}.txt"
        path.write_text("x" * a.context)
        prompt = ["--prompt-file", path]
        # The cache the measured tokens read: the prompt, the warm-up and half the run, on average.
        kv_read = kv_bytes_per_position(model) * (a.context + a.warmup + a.tokens / 2)
    disk = run([a.bin, "bench-io", "--model", model, "--tokens", 4]).stdout
    disk_gbps = float(re.search(r"throughput ([\d.]+) GB/s", disk).group(1))
    print(disk.strip())
    # Warm the expert files into host RAM (tier 2: the page cache).
    for f in sorted((model / "experts").iterdir()):
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    rows = []
    runs = {}
    runs_to_do = [(k, cap, share) for k in map(int, a.ks.split(",")) for cap in a.caps.split(",")
                  for share in a.cpu_shares.split(",")]
    for k, cap, share in runs_to_do:
        label = cap if share == "0" else f"{cap}, CPU {share}"
        stats = work / f"decode-k{k}-cap{cap}-cpu{share}.json"
        cmd = [a.bin, "generate", "--model", model, "--device", a.device, *prompt,
               "--experts-per-token", k, "--max-tokens", a.tokens, "--warmup-tokens", a.warmup,
               "--stats-json", stats, "--cpu-expert-share", share]
        if cap != "auto":
            cmd += ["--gpu-expert-cache-gib", f"{float(cap) * layers / 60 * (a.experts or 512) / 512:.3f}"]
        if a.host_cache_mib:
            cmd += ["--expert-cache-mib", a.host_cache_mib]
        if a.prefetch:
            cmd += ["--prefetch-experts"]
        if a.no_cuda_graphs:
            cmd += ["--no-cuda-graphs"]
        r = run(cmd)
        s = json.loads(stats.read_text())
        runs[f"k{k}-cap{cap}-cpu{share}"] = s
        calls = max(s["decode_calls"], 1)
        v = s["decode_vram"] or {"hits": 0, "misses": 0, "budget_bytes": 0}
        hits, misses = v["hits"] / calls, v["misses"] / calls
        io = s["decode_io"]
        cold = io["bytes_cold"] / calls
        sec = s["decode_seconds"] / calls
        phases = s["decode_phase_seconds"]
        # After the forward pass returns: the logits' download, which waits for the GPU to
        # finish the last layer's experts (their copies too) and the lm_head, then sampling.
        # The last layer's share of it cannot be told apart from the per-token costs here,
        # so the 60-layer estimate scales all of it with depth: it is a lower bound (with
        # every expert in VRAM, about 0.3 ms of download and sampling per token is counted
        # 60 / layers times). Two depths (--layers 4,8) give a closer estimate.
        after = sec - sum(phases.values()) / calls
        outside = phases["lm_head"] / calls
        per_layer = (sec - outside) / layers
        floor = (dense + kv_read) / hbm + hits * EXPERT_RECORD / hbm + misses * EXPERT_RECORD / h2d + cold / (disk_gbps * 1e9)
        floor_outside = lm_head / hbm
        est60 = 60 * per_layer + outside
        floor60 = 60 * (floor - floor_outside) / layers + floor_outside
        host_share = 100 * io["cache_hits"] / max(io["fetches"], 1)
        rows.append((k, label, 1 / sec, per_layer * 1e3, 1 / est60,
                     100 * hits / max(hits + misses, 1e-9), hits * EXPERT_RECORD / 1e6,
                     (misses * EXPERT_RECORD - cold) / 1e6, cold / 1e6, 1 / floor, floor / sec, floor60 / est60,
                     after * 1e3, v["budget_bytes"] / 2**30, host_share,
                     100 * v.get("device_routed", 0) / (calls * layers),
                     100 * v.get("replayed_steps", 0) / (calls * layers)))
        print(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "", flush=True)
        print(f"  K={k} cap {label}: CPU share at the end {s.get('cpu_expert_share', 0):.2f}; ms per token by phase: " +
              ", ".join(f"{name} {1e3 * t / calls:.2f}" for name, t in phases.items()), flush=True)
    return {"layers": layers, "dense_bytes": dense, "kv_bytes": kv_read, "disk_gbps": disk_gbps, "rows": rows,
            "runs": runs}


def print_table(m, hbm, h2d):
    print()
    print(f"decode benchmark: synthetic Qwen3.5-397B shapes, {m['layers']} of 60 layers, random routing; "
          f"dense {m['dense_bytes'] / 1e9:.2f} GB and KV cache {m['kv_bytes'] / 1e9:.2f} GB read per token; HBM {hbm / 1e9:.0f} GB/s, "
          f"H2D {h2d / 1e9:.1f} GB/s, disk {m['disk_gbps']:.2f} GB/s (same session)")
    head = ("K", "cap GiB (60-layer)", "tok/s", "ms/layer", "60-layer tok/s", "VRAM hit%", "MB/tok VRAM", "MB/tok host",
            "MB/tok disk", "floor tok/s", "of floor", "60-layer of floor (est.)", "ms/token after the layers",
            "budget GiB", "host hits in pinned cache %", "layer steps routed on the GPU %",
            "layer steps replayed %")
    print(" | ".join(head))
    for r in m["rows"]:
        print(" | ".join([str(r[0]), r[1]] + [f"{x:.2f}" for x in r[2:]]))


def two_depths(shallow, deep):
    """Per-layer time and floor from the difference between two depths; what remains at the
    shallow depth is the per-token cost (lm_head, logits download, sampling)."""
    span = deep["layers"] - shallow["layers"]
    out = []
    for s, d in zip(shallow["rows"], deep["rows"]):
        t_s, t_d = 1 / s[2], 1 / d[2]
        f_s, f_d = 1 / s[9], 1 / d[9]
        per_layer, floor_layer = (t_d - t_s) / span, (f_d - f_s) / span
        fixed, floor_fixed = t_s - shallow["layers"] * per_layer, f_s - shallow["layers"] * floor_layer
        est60, floor60 = 60 * per_layer + fixed, 60 * floor_layer + floor_fixed
        out.append((s[0], s[1], per_layer * 1e3, fixed * 1e3, 1 / est60, 1 / floor60, floor60 / est60, s[5], d[5]))
    print()
    print(f"60 layers from two depths ({shallow['layers']} and {deep['layers']} layers): the time of a layer is the "
          f"difference over {span} layers; the hit rates should match, or the deeper run's layers look cheaper "
          f"(more hits) or dearer")
    print(" | ".join(("K", "cap GiB (60-layer)", "ms/layer", "ms/token besides", "60-layer tok/s",
                      "60-layer floor tok/s", "of floor", f"VRAM hit% ({shallow['layers']} layers)",
                      f"VRAM hit% ({deep['layers']} layers)")))
    for r in out:
        print(" | ".join([str(r[0]), r[1]] + [f"{x:.2f}" for x in r[2:]]))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default="dist/flash-moe")
    p.add_argument("--device", default="cuda", help="cpu only to try this script where there is no GPU")
    p.add_argument("--workdir", default="/root/flash-moe-bench")
    p.add_argument("--layers", help="one depth, or two (e.g. 4,8) for a closer 60-layer estimate; "
                                    "default: what the disk holds, leaving 8 GB")
    p.add_argument("--experts", type=int, help="experts per layer (default: the real 512)")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--context", type=int, default=0, help="prompt tokens before decoding (default: a 1-token prompt)")
    p.add_argument("--warmup", type=int, default=48)
    p.add_argument("--ks", default="4,10")
    p.add_argument("--cpu-shares", default="0",
                   help="shares of the missed experts the CPU computes (--cpu-expert-share), e.g. 0,0.3,auto")
    p.add_argument("--caps", default="0,16,24,auto",
                   help="VRAM expert cache caps in GiB for the full model (60 layers of 512 experts), or auto; "
                        "the cap used is scaled by layers/60 and experts/512, so that it holds the same share of "
                        "the experts as in the full model")
    p.add_argument("--host-cache-mib", type=int, default=0,
                   help="pinned in-process expert cache; with --prefetch every expert is in host RAM first")
    p.add_argument("--prefetch", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true", help="launch decode steps kernel by kernel")
    p.add_argument("--hbm-gbps", type=float, required=True, help="device-to-device copy, read + write")
    p.add_argument("--h2d-gbps", type=float, required=True, help="pinned host-to-device copy")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    a = p.parse_args()

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if a.layers is None:
        free = shutil.disk_usage(work).free
        per_layer = (a.experts or 512) * EXPERT_RECORD + 60e6
        depths = [max(1, min(60, int((free - 8e9 - 2.2e9) // per_layer)))]
    else:
        depths = sorted(int(d) for d in a.layers.split(","))
    if len(depths) > 2:
        p.error("--layers takes one depth or two")
    # A stream of reads moves bytes at the copy's read + write rate (on an H200: 4.2 TB/s for
    # the copy, 4.4 TB/s for a read-only kernel), so weights read once cost bytes / that rate.
    hbm = a.hbm_gbps * 1e9
    h2d = a.h2d_gbps * 1e9
    measured = [measure(a, layers, hbm, h2d) for layers in depths]
    for m in measured:
        print_table(m, hbm, h2d)
    result = dict(measured[-1], hbm_gbps=hbm / 1e9, h2d_gbps=h2d / 1e9)
    if len(measured) == 2:
        result["two_depths"] = two_depths(*measured)
        result["by_depth"] = {m["layers"]: m for m in measured}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    json.dump(result, open(Path(a.out) / "decode-bench.json", "w"), indent=1)


if __name__ == "__main__":
    sys.exit(main())
