"""Holds GPU memory from another process until only LEAVE_GIB GiB are free, as on a smaller
card, then touches READY_FILE and sleeps until killed. Needs PyTorch (the GPU machine has it).

usage: python3 tools/gpu_fill.py LEAVE_GIB READY_FILE
"""

import sys
import time

import torch

leave = int(float(sys.argv[1]) * 2**30)
free, _ = torch.cuda.mem_get_info()
held = torch.empty(max(free - leave, 0), dtype=torch.uint8, device="cuda")
print(f"holding {held.numel() / 2**30:.1f} GiB; {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB free", flush=True)
open(sys.argv[2], "w").close()
time.sleep(3600)
