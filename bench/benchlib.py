"""What every section of bench.py shares: the contenders, timing, the result table and its targets."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a plain checkout too (the GPU machine has no install)

from unetpp3d.model.fused import flop_counter_mode  # noqa: E402
from unetpp3d.model.network import UNetPlusPlus3D, load_model  # noqa: E402

CLASSES = 3


@dataclass
class Widths:
    """The contenders' widths: equal FLOPs (checked at start by :func:`check_flops`).

    ``--tiny`` divides every width by 8 (FLOPs by about 64) for a dry run of the code on a CPU."""

    ours: tuple[int, ...] = (32, 32, 64, 128, 256)
    monai: tuple[int, ...] = (32, 32, 64, 128, 256, 32)

    def shrink(self, factor: int) -> None:
        self.ours = tuple(max(1, f // factor) for f in self.ours)
        self.monai = tuple(max(1, f // factor) for f in self.monai)


WIDTHS = Widths()


def build(kind: str, device: torch.device, deep_supervision: bool = True, model: Path | None = None,
          classes: int = CLASSES):
    """A fresh network: ``ours``, ``monai_upp`` (BasicUNetPlusPlus) or ``monai_unet`` (BasicUNet)."""
    torch.manual_seed(0)
    if kind == "ours":
        net = load_model(model) if model else UNetPlusPlus3D(1, classes, WIDTHS.ours, deep_supervision=True)
    elif kind == "monai_upp":
        from monai.networks.nets import BasicUNetPlusPlus

        net = BasicUNetPlusPlus(3, 1, classes, WIDTHS.monai, deep_supervision=deep_supervision)
    elif kind == "monai_unet":
        from monai.networks.nets import BasicUNet

        net = BasicUNet(3, 1, classes, WIDTHS.monai)
    else:
        raise ValueError(kind)
    return net.to(device)


def predictor(net, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """One logits tensor per call, as a sliding window wants: MONAI's UNet++ returns a list."""
    if kind == "monai_upp":
        return lambda x: net(x)[-1]
    return net


def as_list(out) -> list[torch.Tensor]:
    return out if isinstance(out, (list, tuple)) else [out]


def count_flops(fn: Callable[[], object]) -> int:
    with flop_counter_mode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, rounds: int, device: torch.device, warmup: int = 1) -> dict:
    """Seconds per call of each function, one call of each per round: load from other processes
    falls on every contender alike."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync(device)
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, slow, fast) -> float:
    """Median over rounds of slow/fast: how many times faster ``fast`` was in the same round."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of voxels with the same class: ``a`` and ``b`` are logits/probabilities or masks."""
    a = a.argmax(1) if a.is_floating_point() else a
    b = b.argmax(1) if b.is_floating_point() else b
    return (a == b).float().mean().item()


class Table:
    """Rows as they come, and the issue's targets with what was measured against them. With a
    JSON path, the file is rewritten after each row, so that a run stopped by a time limit keeps
    what it measured."""

    def __init__(self, json_path: str | None = None, machine: dict | None = None):
        self.rows: list[dict] = []
        self.targets: list[dict] = []
        self.json_path = json_path
        self.machine = machine or {}

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if v is not None), flush=True)
        self.write()

    def target(self, figure: str, goal: str, measured: str, met: bool | None, note: str = "") -> None:
        """One of the issue's targets: ``met`` None where the figure has no pass mark (a cost to report)."""
        self.targets.append(dict(figure=figure, goal=goal, measured=measured, met=met, note=note))
        print(f"  target: {figure}: {measured} (goal {goal}){'' if met is None else ' met' if met else ' MISSED'}"
              f"{'; ' + note if note else ''}", flush=True)
        self.write()

    def write(self) -> None:
        if self.json_path:
            Path(self.json_path).write_text(json.dumps({"machine": self.machine, "rows": self.rows,
                                                        "targets": self.targets}, indent=1))

    def print(self) -> None:
        cols = ["section", "model", "variant", "time", "rate", "vs_monai", "peak_gib", "agreement", "note"]
        cells = [[_fmt(r.get(c)) for c in cols] for r in self.rows]
        width = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(cols)]
        print("\n" + "  ".join(c.ljust(w) for c, w in zip(cols, width)))
        print("  ".join("-" * w for w in width))
        for row in cells:
            print("  ".join(v.ljust(w) for v, w in zip(row, width)))


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def machine(device: torch.device) -> dict:
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_model(),
        "load_average_start": list(os.getloadavg()),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or "unknown"


def check_flops(table: Table, device: torch.device) -> int:
    """Count both networks' forward FLOPs at 64^3 and refuse to compare unequal networks."""
    x = torch.zeros(1, 1, 64, 64, 64, device=device)
    flops = {}
    for kind in ("ours", "monai_upp", "monai_unet"):
        net = build(kind, device).eval()
        with torch.no_grad():
            flops[kind] = count_flops(lambda: net(x))
    r = flops["ours"] / flops["monai_upp"]
    print(f"forward FLOPs at 64^3: ours {flops['ours'] / 1e9:.1f} G, MONAI UNet++ {flops['monai_upp'] / 1e9:.1f} G "
          f"(ratio {r:.3f}), MONAI BasicUNet {flops['monai_unet'] / 1e9:.1f} G")
    table.target("equal FLOPs, ours / MONAI UNet++", "within 5%", f"{r:.3f}", abs(r - 1) <= 0.05,
                 f"64^3 forward; ours {WIDTHS.ours}, MONAI {WIDTHS.monai}")
    if abs(r - 1) > 0.05:
        raise SystemExit(f"ours/MONAI FLOP ratio {r:.3f} is outside 5%: fix the widths first")
    table.add(section="flops", model="ours/monai_upp", variant="64^3 forward", rate=r,
              note=f"ours {WIDTHS.ours}, MONAI {WIDTHS.monai}")
    return flops["ours"]
