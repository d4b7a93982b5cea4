#!/usr/bin/env python3
"""Hit rates of VRAM expert cache rules on synthetic routing traces (no GPU, no model).

A trace is what the cache sees in decode: for each token, each layer in order picks K of its
experts; a share `reuse` of the previous token's picks is kept (temporal locality) and the
rest drawn from a per-layer Zipf popularity (skew; 0 is uniform). The capacity is counted in
experts. Rules:

  lru     least recently used, with a second chance for experts hit before
  admit   lru, but a missed expert replaces the coldest only if used more often lately
  switch  lru, turning into admit while a cycle of the layers misses more experts than the
          cache holds (the rule of crates/engine/src/backend/cuda/admission.rs)

As in the engine, use counts are halved once the uses since the last halving reach 8x the
keys seen, and the misses per cycle are a running mean giving the last cycle a weight of 1/4.
Standard library only: python3 tools/cache_policy_sim.py [tokens]
"""

import random
import sys
from collections import Counter, OrderedDict


def trace(layers, experts, k, tokens, zipf, reuse, seed=1):
    rng = random.Random(seed)
    pops = []
    for _ in range(layers):
        perm = list(range(experts))
        rng.shuffle(perm)
        pops.append((perm, [1.0 / (i + 1) ** zipf for i in range(experts)]))
    prev = [[] for _ in range(layers)]
    for _ in range(tokens):
        for layer in range(layers):
            chosen = {e for e in prev[layer] if rng.random() < reuse}
            perm, weights = pops[layer]
            while len(chosen) < k:
                chosen.add(perm[rng.choices(range(experts), weights)[0]])
            prev[layer] = list(chosen)
            for e in sorted(chosen):
                yield layer, e


class Uses:
    def __init__(self):
        self.counts = Counter()
        self.since = 0

    def record(self, key):
        self.counts[key] += 1
        self.since += 1
        if self.since >= 8 * len(self.counts):
            self.since = 0
            for key in list(self.counts):
                self.counts[key] //= 2
                if not self.counts[key]:
                    del self.counts[key]


def hit_rate(rule, lookups, capacity):
    cache = OrderedDict()  # key -> second chances left
    uses = Uses()
    hits = misses = cycle_misses = 0
    per_cycle = None
    last_layer = -1
    for key in lookups:
        if key[0] < last_layer:
            per_cycle = cycle_misses if per_cycle is None else per_cycle + 0.25 * (cycle_misses - per_cycle)
            cycle_misses = 0
        last_layer = key[0]
        uses.record(key)
        if key in cache:
            hits += 1
            cache[key] = min(cache.pop(key) + 1, 3)
            continue
        misses += 1
        cycle_misses += 1
        filtered = rule == "admit" or (rule == "switch" and per_cycle is not None and per_cycle > capacity)
        admitted = True
        while len(cache) >= capacity:
            victim, credit = next(iter(cache.items()))
            if filtered and credit == 0 and not uses.counts[key] > uses.counts[victim]:
                admitted = False
                break
            del cache[victim]
            if credit:
                cache[victim] = credit - 1
        if admitted:
            cache[key] = 0
    return hits / (hits + misses)


CASES = [
    # name, layers, experts, K, zipf, reuse, capacity (experts)
    ("bench: 8 layers x 64, K=10, uniform, 11%", 8, 64, 10, 0.0, 0.0, 57),
    ("bench: 8 x 64, K=10, zipf 0.5, 11%", 8, 64, 10, 0.5, 0.0, 57),
    ("bench: 8 x 64, K=4, zipf 0.3, 11%", 8, 64, 4, 0.3, 0.0, 57),
    ("397B: K=10, zipf 0.8, reuse 0.2, 24 GiB", 60, 512, 10, 0.8, 0.2, 3400),
    ("397B: K=10, zipf 0.8, reuse 0.2, 8 GiB", 60, 512, 10, 0.8, 0.2, 1130),
    ("397B: K=10, zipf 0.8, reuse 0.2, 3 GiB", 60, 512, 10, 0.8, 0.2, 430),
    ("397B: K=4, zipf 0.8, reuse 0.3, 24 GiB", 60, 512, 4, 0.8, 0.3, 3400),
    ("397B: K=10, uniform, reuse 0.3, 24 GiB", 60, 512, 10, 0.0, 0.3, 3400),
    ("397B: K=10, uniform, reuse 0.3, 8 GiB", 60, 512, 10, 0.0, 0.3, 1130),
    ("397B: K=10, zipf 0.5, reuse 0.4, 3 GiB", 60, 512, 10, 0.5, 0.4, 400),
]


def main():
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    print(f"hit rates over {tokens} tokens: " + ", ".join(("lru", "admit", "switch")))
    for name, layers, experts, k, zipf, reuse, capacity in CASES:
        lookups = list(trace(layers, experts, k, tokens, zipf, reuse))
        rates = [hit_rate(rule, lookups, capacity) for rule in ("lru", "admit", "switch")]
        print(f"{name:45s} " + "  ".join(f"{100 * r:5.1f}%" for r in rates), flush=True)


if __name__ == "__main__":
    main()
