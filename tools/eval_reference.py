#!/usr/bin/env python3
"""Perplexity of an MLX model on a text by mlx-lm: the outside reference for `flash-moe eval`.

Same protocol as `flash-moe eval`: the text's token ids (Python `tokenizers` on the model's
tokenizer.json), non-overlapping windows of --window tokens, each from a fresh state, every
token but a window's first predicted, computed in float32.

  python3 tools/eval_reference.py --model models/tiny-qwen35moe-4bit --text models/heldout.txt \
      --windows 8 > tests/fixtures/bundled-eval-reference.json
"""

import argparse
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.utils import load_model
from tokenizers import Tokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--windows", type=int, default=8)
    a = p.parse_args()
    model, _ = load_model(Path(a.model))
    model.set_dtype(mx.float32)
    ids = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json")).encode(Path(a.text).read_text()).ids
    nll, count = 0.0, 0
    for w in range(a.windows):
        chunk = ids[w * a.window:(w + 1) * a.window]
        logits = model(mx.array([chunk]))[0].astype(mx.float32)
        lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        lp = np.array(lp)
        nll -= sum(float(lp[t, chunk[t + 1]]) for t in range(a.window - 1))
        count += a.window - 1
    import mlx_lm
    print(json.dumps({"model": a.model, "text": a.text, "window": a.window, "windows": a.windows,
                      "predictions": count, "perplexity": math.exp(nll / count), "mlx_lm": mlx_lm.__version__}))


if __name__ == "__main__":
    main()
