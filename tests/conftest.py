"""Test-wide settings: offline hub (a stray download fails fast), deterministic CPU threads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tiny models: OpenMP worker threads spinning against each other on a busy 2-core machine slow toy
# ops ~100x; one thread keeps the suite fast and its timings stable.
torch.set_num_threads(1)
