"""Run logs: `metrics.jsonl` (one JSON object per line) and, optionally, TensorBoard.

Training records carry step, tokens, loss, lr, grad_norm, tokens_per_s and mfu (null where the
device's peak FLOP/s is unknown); validation records carry val_loss and val_ppl. On resume the
records after the checkpoint's step are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmstack.errors import InputError
from lmstack.io import atomic_write

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s of common GPUs (vendor data sheets), for MFU when --peak-flops is 0.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12, "4090": 165e12}


def peak_flops(configured: float, device) -> float | None:
    if configured:
        return configured
    if device.type == "cuda":
        import torch

        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value
    return None


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, run_dir, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step]
            with atomic_write(self.path) as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        self.file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in clean.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.close()
