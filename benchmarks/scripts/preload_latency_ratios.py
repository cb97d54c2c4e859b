# The report's preload and latency ratios (extraction against the fastest bare-backbone arm; FPT network against the
# fastest bare arm), from the bench's own functions, without the rest of `fpt-monai bench` (about 3 min).
# Run: .venv/bin/python benchmarks/scripts/preload_latency_ratios.py
# With glibc's allocator kept from returning memory to the system (no mmap for large blocks, no trimming):
#   MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 .venv/bin/python benchmarks/scripts/preload_latency_ratios.py
import json
from fpt_monai.bench import speed
p = speed.preload_throughput(repeats=5)
l = speed.inference_latency(repeats=5)
print("preload %.3f latency %.3f" % (p["kv_extraction"] / max(v for k, v in p.items() if k.startswith("bare")), l["fpt_network"] / min(v for k, v in l.items() if k.startswith("bare"))), json.dumps(p), json.dumps(l), flush=True)
