"""Run logs: `metrics.jsonl` (one JSON object per line) and, optionally, TensorBoard.

Training records carry step, tokens, loss, lr, grad_norm, tokens_per_s and mfu (null where the
device's peak FLOP/s is unknown); validation records carry val_loss and val_ppl. On resume the
records after the checkpoint's step are dropped, so the file reads as one uninterrupted run; a
fresh run (no checkpoint yet) starts the file anew, so a run restarted after a crash before its
first checkpoint does not repeat records. A last line cut short (a kill mid-write) is dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lmstack.errors import FormatError, InputError
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
    """The run's records. A last line without its newline is a write the run did not finish
    (killed mid-write), so it is dropped; any other unreadable line is an error naming it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")[:-1]  # the text after the last newline was never finished
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise FormatError(f"{path}:{number}: not a metrics record (a JSON object with a step); fix or delete that line")
        records.append(record)
    return records


class MetricsLog:
    def __init__(self, run_dir, enabled: bool, tensorboard: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.tb = None
        if not enabled:
            return
        kept = [r for r in read_metrics(run_dir) if r["step"] <= resume_step] if resume_step is not None else []
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
