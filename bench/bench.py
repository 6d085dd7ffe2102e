#!/usr/bin/env python
"""Time unetpp3d's UNet++ against MONAI's BasicUNetPlusPlus (and BasicUNet), in one process.

    python bench/bench.py --device cpu --quick --json cpu.json      # this machine, a few minutes
    python bench/bench.py --device cpu --json cpu.json              # more rounds, every mode
    python bench/bench.py --device cuda --json gpu.json             # one GPU, an estimated 6-8 minutes
    python bench/bench.py --device cuda --quick --no-compile        # the shortest GPU run

Both networks get the same FLOPs: MONAI's features (32, 32, 64, 128, 256, 32) and ours
(32, 32, 64, 128, 256) count the same convolution FLOPs (printed; the run stops if they differ by
more than 5%). Weights are random unless ``--model`` names a trained unetpp3d model: voxel
agreement between *different* functions (fast L2 against accurate) means little with random
weights, so the notes say so.

Sections (``--sections``), each timed with every contender interleaved round by round, so that
load from other processes hits all of them alike; times are medians, ratios the median of the
per-round ratios:

  CPU  forward    one forward at 64^3, GFLOP/s, against one 3x3x3 convolution (the ceiling)
       sliding    sliding-window inference (roi 96, overlap 0.25) over a CT of ~122x101x112
       trainmem   peak resident memory of one training step, each model in a child process
       endtoend   `unetpp3d infer` on that CT as a file, accurate and fast (L2), in a fresh process
  CUDA train      training step at batch 2, 128^3: fp32/TF32, bf16, fp16, torch.compile; TFLOP/s,
                  peak GiB, and the convolutions-alone floor of the same step
       infer      sliding-window inference over 256^3 (roi 128), each mode's voxel agreement with
                  the overlap-0.5 fp32 reference

The table is printed last; ``--json`` writes every row with the machine, versions and settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a plain checkout too (the GPU machine has no install)

from unetpp3d.hardware import autocast_dtype, keep_freed_memory  # noqa: E402
from unetpp3d.model.fused import flop_counter_mode  # noqa: E402
from unetpp3d.model.network import UNetPlusPlus3D, load_model  # noqa: E402

CLASSES = 3
OURS_FEATURES = (32, 32, 64, 128, 256)
MONAI_FEATURES = (32, 32, 64, 128, 256, 32)
CT_PATH = REPO.parent / "shared" / "data" / "abdomen_ct_ts" / "ct.nii.gz"
CT_SHAPE = (122, 101, 112)  # the 3 mm abdominal CT, (x, y, z)


# --------------------------------------------------------------------------------------------
# set-up


def tune_cpu_allocator() -> bool:
    """The setting the ``unetpp3d`` command applies at start-up (unetpp3d/hardware.py), here
    for every contender alike."""
    return keep_freed_memory()


def build(kind: str, device: torch.device, deep_supervision: bool = True, model: Path | None = None):
    """A fresh network: ``ours``, ``monai_upp`` (BasicUNetPlusPlus) or ``monai_unet`` (BasicUNet)."""
    torch.manual_seed(0)
    if kind == "ours":
        net = load_model(model) if model else UNetPlusPlus3D(1, CLASSES, OURS_FEATURES, deep_supervision=True)
    elif kind == "monai_upp":
        from monai.networks.nets import BasicUNetPlusPlus

        net = BasicUNetPlusPlus(3, 1, CLASSES, MONAI_FEATURES, deep_supervision=deep_supervision)
    elif kind == "monai_unet":
        from monai.networks.nets import BasicUNet

        net = BasicUNet(3, 1, CLASSES, MONAI_FEATURES)
    else:
        raise ValueError(kind)
    return net.to(device)


def predictor(net, kind: str, level: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """One logits tensor per call, as a sliding window wants: MONAI's UNet++ returns a list; ours
    takes its pruning level per call."""
    if kind == "monai_upp":
        return lambda x: net(x)[-1]
    if kind == "ours" and level is not None:
        return partial(net, prune_level=level)
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


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round (see the module docstring)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> float:
    """Median over rounds of slow/fast: how many times faster ``fast`` was in the same round."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of voxels with the same argmax class."""
    return (a.argmax(1) == b.argmax(1)).float().mean().item()


class Table:
    """Rows as they come; with a JSON path, the file is rewritten after each row, so that a run
    stopped by a time limit keeps what it measured."""

    def __init__(self, json_path: str | None = None, machine: dict | None = None):
        self.rows: list[dict] = []
        self.json_path = json_path
        self.machine = machine or {}

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items() if v is not None), flush=True)
        self.write()

    def write(self) -> None:
        if self.json_path:
            Path(self.json_path).write_text(json.dumps({"machine": self.machine, "rows": self.rows}, indent=1))

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
    if abs(r - 1) > 0.05:
        raise SystemExit(f"ours/MONAI FLOP ratio {r:.3f} is outside 5%: fix OURS_FEATURES first")
    table.add(section="flops", model="ours/monai_upp", variant="64^3 forward", rate=r,
              note=f"ours {OURS_FEATURES}, MONAI {MONAI_FEATURES}")
    return flops["ours"]


# --------------------------------------------------------------------------------------------
# CPU


def cpu_forward(table: Table, args) -> None:
    """One forward at 64^3 (batch 1), inference mode, fp32 and bf16 autocast."""
    device = torch.device("cpu")
    rounds = 3 if args.quick else 7
    x = torch.randn(1, 1, 64, 64, 64)
    cl = torch.channels_last_3d
    nets = {k: build(k, device).eval() for k in ("ours", "monai_upp", "monai_unet")}
    # The reference path as the code ran before the fused one existed: contiguous weights.
    reference = build("ours", device).eval().to(memory_format=torch.contiguous_format)
    reference.fused = False
    monai_cl = build("monai_upp", device).eval().to(memory_format=cl)
    conv = torch.nn.Conv3d(32, 32, 3, padding=1, bias=False).to(memory_format=cl)
    xc = torch.randn(1, 32, 64, 64, 64).contiguous(memory_format=cl)

    fns = {
        "conv3x3 32->32": lambda: conv(xc),
        "monai_upp": lambda: nets["monai_upp"](x),
        "monai_upp channels_last": lambda: monai_cl(x.contiguous(memory_format=cl)),
        "monai_unet": lambda: nets["monai_unet"](x),
        "ours reference": lambda: reference(x),
        "ours fused": lambda: nets["ours"](x),
    }
    with torch.no_grad():
        flops = {k: count_flops(f) for k, f in fns.items()}
    for dtype in (torch.float32, torch.bfloat16):
        tag = "fp32" if dtype == torch.float32 else "bf16"
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            times = interleaved(fns, rounds, device)
        best_monai = min(("monai_upp", "monai_upp channels_last"), key=lambda k: statistics.median(times[k]))
        for name, ts in times.items():
            med = statistics.median(ts)
            vs = None
            if name.startswith("ours"):
                vs = ratio(times, best_monai, name) * flops[name] / flops[best_monai]  # per FLOP
            table.add(section="cpu forward 64^3", model=name.split()[0], variant=f"{tag} {' '.join(name.split()[1:])}".strip(),
                      time=f"{med * 1e3:.0f} ms", rate=f"{flops[name] / med / 1e9:.0f} GFLOP/s", vs_monai=vs,
                      note=f"min {min(ts) * 1e3:.0f} ms, {rounds} rounds" + (f"; vs {best_monai}" if vs else ""))


def load_ct(path: Path) -> tuple[torch.Tensor, str]:
    """The 3 mm abdominal CT as a (1, 1, x, y, z) tensor of the issue's shape, scaled to about [-1, 1].

    The stored case is 122x101x30; its slices are mirrored along z up to 112 so that the sliding
    window sees real anatomy and the issue's window count. Falls back to smooth noise."""
    import numpy as np

    try:
        import SimpleITK as sitk

        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose(2, 1, 0).astype(np.float32)
        source = f"{path.name} {arr.shape[0]}x{arr.shape[1]}x{arr.shape[2]}"
        if arr.shape != CT_SHAPE:
            pads = [(0, max(0, t - s)) for s, t in zip(arr.shape, CT_SHAPE)]
            arr = np.pad(arr, pads, mode="symmetric")[: CT_SHAPE[0], : CT_SHAPE[1], : CT_SHAPE[2]]
            source += f", mirrored to {'x'.join(map(str, CT_SHAPE))}"
        vol = torch.from_numpy(np.clip(arr, -1000, 1000) / 1000.0)
    except (ImportError, RuntimeError, OSError) as exc:
        torch.manual_seed(3)
        vol = F.avg_pool3d(torch.randn(1, 1, *CT_SHAPE), 5, stride=1, padding=2)[0, 0] * 5
        source = f"synthetic smooth noise {'x'.join(map(str, CT_SHAPE))} ({type(exc).__name__}: {exc})"
    return vol[None, None].contiguous(), source


def cpu_sliding(table: Table, args) -> None:
    """Sliding-window inference over the CT: ours accurate and fast (L2) against MONAI."""
    from monai.inferers import sliding_window_inference

    device = torch.device("cpu")
    vol, source = load_ct(Path(args.ct))
    print(f"volume: {source}")
    roi, overlap, swb = (96, 96, 96), args.overlap, args.sw_batch
    rounds = 1 if args.quick else 3
    random_note = "" if args.model else "; random weights: agreement of L2 with accurate is not meaningful"

    ours = build("ours", device, model=args.model).eval()
    monai_upp = build("monai_upp", device, deep_supervision=False).eval()
    monai_unet = build("monai_unet", device).eval()

    def run(net, kind: str, level: int | None = None, bf16: bool = False, ov: float = overlap):
        def go():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return sliding_window_inference(vol, roi, swb, predictor(net, kind, level), overlap=ov,
                                                mode="gaussian").float()
        return go

    ours.fused = False  # the reference mask comes from the plain path
    with torch.inference_mode():
        reference = run(ours, "ours", None, False, 0.5)()
    ours.fused = True
    modes = {
        ("monai_upp", "fp32"): run(monai_upp, "monai_upp"),
        ("monai_upp", "bf16"): run(monai_upp, "monai_upp", bf16=True),
        ("monai_unet", "fp32"): run(monai_unet, "monai_unet"),
        ("monai_unet", "bf16"): run(monai_unet, "monai_unet", bf16=True),
        ("ours", "accurate fp32"): run(ours, "ours"),
        ("ours", "accurate bf16"): run(ours, "ours", bf16=True),
        ("ours", "fast L2 fp32"): run(ours, "ours", 2),
        ("ours", "fast L2 bf16"): run(ours, "ours", 2, bf16=True),
    }
    if args.quick:  # the MONAI bf16 rows add little to what the fp32 ones and the forward section say
        del modes[("monai_upp", "bf16")], modes[("monai_unet", "bf16")]
    outputs: dict = {}

    def keep(key, fn):
        def call():
            outputs[key] = fn()
        return call

    # One window through each network and precision first: oneDNN builds its kernels on first use.
    window = vol[..., : roi[0], : roi[1], : roi[2]].expand(swb, -1, -1, -1, -1).contiguous()
    for net, kind in ((ours, "ours"), (monai_upp, "monai_upp"), (monai_unet, "monai_unet")):
        for bf16 in (False, True):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                predictor(net, kind)(window)
    times = interleaved({k: keep(k, f) for k, f in modes.items()}, rounds, device, warmup=0)
    for (model, variant), ts in times.items():
        med = statistics.median(ts)
        vs = agree = None
        note = f"{rounds} round(s)"
        if model == "ours":
            precision = "bf16" if "bf16" in variant and ("monai_upp", "bf16") in times else "fp32"
            vs = ratio(times, ("monai_upp", precision), (model, variant))
            agree = agreement(outputs[(model, variant)], reference)
            note = f"vs monai_upp {precision}; agreement with ours plain fp32 overlap 0.5; " + note
            if "L2" in variant:
                note += random_note
        table.add(section=f"cpu sliding roi96 ov{overlap} swb{swb}", model=model, variant=variant,
                  time=f"{med:.1f} s", vs_monai=vs, agreement=agree, note=note)


def cpu_trainmem(table: Table, args) -> None:
    """Peak resident memory of one training step at 64^3, each model in its own process."""
    for variant in ("monai_upp", "ours reference", "ours fused", "ours fused checkpointing"):
        out = subprocess.run([sys.executable, __file__, "--train-rss-child", variant], capture_output=True, text=True)
        if out.returncode:
            table.add(section="cpu train memory", model=variant.split()[0], variant=variant, note=out.stderr[-200:])
            continue
        got = json.loads(out.stdout.strip().splitlines()[-1])
        table.add(section="cpu train memory 64^3 b1", model=variant.split()[0], variant=" ".join(variant.split()[1:]) or "fp32",
                  time=f"{got['seconds']:.1f} s", peak_gib=got["step_gib"],
                  note="peak RSS of forward+backward above the RSS before it, default allocator")


def cpu_endtoend(table: Table, args) -> None:
    """``unetpp3d infer`` on the CT as a NIfTI file, timed as a user sees it: a fresh process that
    imports, reads, preprocesses, slides the window, post-processes and writes the mask.

    The model has the bench's widths and random weights; its preprocessing keeps the scan's 3 mm
    grid (what a model planned on such scans does), so there is no resampling. Each mode runs
    with the command's defaults (bf16 on CPUs with native bf16, and the allocator setting: see
    unetpp3d/hardware.py), in fp32 (``--no-amp``), and in fp32 with glibc's default allocator.
    """
    import tempfile

    import numpy as np
    import SimpleITK as sitk

    from unetpp3d.config import Config, Preprocessing

    vol, source = load_ct(Path(args.ct))
    hu = vol[0, 0].numpy().transpose(2, 1, 0) * 1000.0  # back to HU, (z, y, x) for SimpleITK
    rounds = 1 if args.quick else 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
        image.SetSpacing((3.0, 3.0, 3.0))
        try:  # the stored scan's orientation and position
            stored = sitk.ReadImage(str(args.ct))
            image.SetDirection(stored.GetDirection())
            image.SetOrigin(stored.GetOrigin())
        except RuntimeError:
            pass
        sitk.WriteImage(image, str(tmp / "ct.nii.gz"))
        torch.manual_seed(0)
        net = UNetPlusPlus3D(1, 2, OURS_FEATURES, deep_supervision=True)
        cfg = Config(task="liver")
        cfg.infer.overlap, cfg.infer.sw_batch_size = args.overlap, args.sw_batch
        prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver"}, target_spacing=[3.0, 3.0, 3.0],
                             intensity_range=[-1000.0, 1000.0], intensity_stats=[60.0, 100.0],
                             patch_size=[96, 96, 96], body_threshold_hu=-500.0)
        torch.save({"model_args": net.model_args, "state_dict": net.state_dict(), "preprocessing": prep.to_dict(),
                    "config": cfg.to_dict(), "epoch": 0}, tmp / "best.pt")
        runs = {}
        # (variant, extra flags, allocator setting): the command's defaults first, then fp32
        # (--no-amp), then fp32 with glibc's default allocator.
        settings = (("", [], []), (" fp32", ["--no-amp"], []), (" fp32 default malloc", ["--no-amp"], ["--no-malloc-tuning"]))
        for mode, mode_flags in (("accurate", []), ("fast L2", ["--mode", "fast", "--prune-level", "2"])):
            for suffix, flags, tuned in settings:
                def go(args_=mode_flags + flags, tuned=tuned, name=f"{mode}{suffix}"):
                    out = tmp / f"mask {name}.nii.gz"
                    proc = subprocess.run([sys.executable, "-m", "unetpp3d", *tuned, "infer", str(tmp / "ct.nii.gz"),
                                           "--out", str(out), "--model", str(tmp / "best.pt"), "--device", "cpu",
                                           *args_], capture_output=True, text=True)
                    if proc.returncode:
                        raise RuntimeError(proc.stderr[-500:])
                runs[(mode, suffix)] = go
        times = interleaved(runs, rounds, torch.device("cpu"), warmup=0)
    low = autocast_dtype("auto", torch.device("cpu"))
    default_precision = str(low).replace("torch.", "") if low else "fp32 (no native bf16 here)"
    targets = {"accurate": 30.0, "fast L2": 10.0}
    for (mode, suffix), ts in times.items():
        med = statistics.median(ts)
        what = f"infer's defaults: {default_precision}, allocator setting" if not suffix else suffix.strip()
        note = (f"target < {targets[mode]:.0f} s; {what}; {rounds} round(s); {source}; "
                f"overlap {args.overlap}, {args.sw_batch} windows a batch")
        table.add(section="cpu end-to-end `unetpp3d infer`", model="ours", variant=f"{mode}{suffix or ' default'}",
                  time=f"{med:.1f} s", note=note)


def _rss_kib(field: str) -> int:
    """VmRSS or VmHWM of this process, in KiB. Per address space, unlike ru_maxrss, which a
    child started by fork and exec inherits from its (here much larger) parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _train_rss_child(variant: str) -> None:
    # glibc's default allocator returns freed blocks, so the high-water mark tracks live tensors
    # (with tune_cpu_allocator it would also hold everything freed and kept for reuse).
    kind = variant.split()[0]
    net = build(kind, torch.device("cpu")).train()
    if kind == "ours":
        net.fused = "fused" in variant
        net.checkpointing = "checkpointing" in variant
    x = torch.randn(1, 1, 64, 64, 64)
    y = torch.randint(0, CLASSES, (1, 64, 64, 64))
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    heads = net(x)
    loss = sum(F.cross_entropy(h, y) for h in heads) / len(heads)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    print(json.dumps({"step_gib": (peak - before) / 2**20, "seconds": seconds}))


# --------------------------------------------------------------------------------------------
# CUDA


def cuda_train(table: Table, args) -> None:
    """Training step at batch 2, 128^3, 3 classes, deep supervision; AdamW; cross-entropy per head."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    batch, size = 2, (32 if args.tiny else 128)
    amp = device.type
    iters = 2 if args.tiny else 5 if args.quick else 15
    x = torch.randn(batch, 1, size, size, size, device=device)
    y = torch.randint(0, CLASSES, (batch, size, size, size), device=device)

    # Most telling first, so that a run cut short by a time limit still has them (--json is
    # rewritten after every row). "channels_last" for ours is its own switch (on by default);
    # for MONAI it converts weights and input.
    variants = [  # (model, dtype, channels_last, compile, checkpointing)
        ("ours", "bf16", True, False, False),
        ("monai_upp", "bf16", False, False, False),
        ("ours", "bf16", True, False, True),
        ("ours", "fp32", True, False, False),
        ("monai_upp", "fp32", False, False, False),
        ("ours", "fp16", True, False, False),
        ("monai_upp", "fp16", False, False, False),
        ("monai_upp", "bf16", True, False, False),
        ("ours", "bf16", False, False, False),
        ("monai_unet", "bf16", False, False, False),
    ]
    if not args.no_compile:
        variants += [("ours", "bf16", True, True, False), ("monai_upp", "bf16", False, True, False),
                     ("ours", "bf16", True, True, True)]
    if args.quick:
        variants = [v for v in variants if v[1] == "bf16" or (v[1] == "fp32" and v[0] != "monai_unet")]
    if device.type == "cpu":  # a dry run: fp16 convolutions have no fast CPU kernel here
        variants = [v for v in variants if v[1] != "fp16"]

    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    section = f"{device.type} train b{batch} {size}^3"
    results = {}
    for kind, dt, cl, compiled, ckpt in variants:
        name = (f"{dt} {'channels_last' if cl else 'ncdhw'}{' compile' if compiled else ''}"
                f"{' checkpointing' if ckpt else ''}")
        net = model = opt = None
        try:
            net = build(kind, device).train()
            if kind == "ours":
                net.checkpointing = ckpt
                net.channels_last = cl
                if not cl:
                    net = net.to(memory_format=torch.contiguous_format)
            elif cl:
                net = net.to(memory_format=torch.channels_last_3d)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
            scaler = torch.amp.GradScaler(amp, enabled=dt == "fp16")
            model = torch.compile(net) if compiled else net
            xin = x.contiguous(memory_format=torch.channels_last_3d) if cl and kind != "ours" else x
            autocast = partial(torch.autocast, amp, dtype=dtypes[dt] or torch.bfloat16, enabled=dtypes[dt] is not None)

            def step():
                opt.zero_grad(set_to_none=True)
                with autocast():
                    heads = as_list(model(xin))
                    loss = sum(F.cross_entropy(h.float(), y) for h in heads) / len(heads)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()

            t0 = time.perf_counter()
            step()
            step()
            sync(device)
            first = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ts = interleaved({"step": step}, iters, device, warmup=0)["step"]
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            with autocast():
                flops = count_flops(lambda: sum(h.float().sum() for h in as_list(net(xin))).backward())
            opt.zero_grad(set_to_none=True)
            floor = conv_floor(net, xin, dtypes[dt], device) if not compiled else None
        except Exception as exc:  # one failing variant (OOM, a compile error) must not end the run
            table.add(section=section, model=kind, variant=name, note=f"FAILED {type(exc).__name__}: {str(exc)[:160]}")
            continue
        finally:
            del model, net, opt
            if device.type == "cuda":
                torch.cuda.empty_cache()
        med = statistics.median(ts)
        results[(kind, name)] = (med, peak)
        note = f"first 2 steps {first:.1f} s" + (" (compile)" if compiled else "")
        if floor:
            note += f"; conv floor {floor * 1e3:.0f} ms, step/floor {med / floor:.2f}"
        table.add(section=section, model=kind, variant=name, time=f"{med * 1e3:.0f} ms",
                  rate=f"{flops / med / 1e12:.1f} TFLOP/s", peak_gib=peak, note=note)
    # ours against MONAI's best configuration of the same precision, time and memory
    for (kind, name), (t, peak) in results.items():
        if kind != "ours":
            continue
        same = [v for (k, n), v in results.items() if k == "monai_upp" and n.split()[0] == name.split()[0]]
        if same:
            best_t = min(v[0] for v in same)
            best_m = min((v[1] for v in same), default=None) if peak is not None else None
            table.add(section=section, model="ours/monai_upp", variant=name,
                      vs_monai=best_t / t, peak_gib=peak / best_m if best_m else None,
                      note=f"speed-up over MONAI's fastest {name.split()[0]}; peak_gib column = memory ratio")


def conv_floor(net, x: torch.Tensor, dtype, device: torch.device) -> float:
    """Seconds for the step's convolutions alone, forward and backward, in the step's precision
    and layouts: every convolution of one forward (recorded below autograd, so also those the
    fused path calls as functions), replayed with random data on its recorded shapes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cl = torch.channels_last_3d
    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                inp, weight, bias, *rest = args
                calls.append((tuple(inp.shape), inp.is_contiguous(memory_format=cl) and inp.shape[1] > 1,
                              tuple(weight.shape), weight.is_contiguous(memory_format=cl), bias is not None, rest))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None), Record():
        net(x)
    cast = dtype or torch.float32
    work = []
    for k, (shape, in_cl, wshape, w_cl, has_bias, rest) in enumerate(calls):
        inp = torch.randn(shape, device=device, dtype=cast)
        weight = torch.randn(wshape, device=device, dtype=cast)
        inp = inp.contiguous(memory_format=cl) if in_cl else inp
        weight = weight.contiguous(memory_format=cl) if w_cl else weight
        inp.requires_grad_(k > 0)  # the first convolution, on the image, needs no input gradient
        weight.requires_grad_(True)
        bias = torch.zeros(wshape[1] if rest[3] else wshape[0], device=device, dtype=cast, requires_grad=True) \
            if has_bias else None
        out = torch.ops.aten.convolution(inp, weight, bias, *rest)
        work.append((inp, weight, bias, rest, torch.randn_like(out)))
    if not work:
        return float("nan")

    def replay():
        for inp, weight, bias, rest, grad in work:
            torch.autograd.backward(torch.ops.aten.convolution(inp, weight, bias, *rest), grad)

    times = interleaved({"floor": replay}, 10, device, warmup=3)["floor"]
    return statistics.median(times)


def cuda_infer(table: Table, args) -> None:
    """Sliding-window inference over a 256^3 volume, roi 128, gaussian blending."""
    from monai.inferers import sliding_window_inference

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    size = 64 if args.tiny else 256
    roi = (32,) * 3 if args.tiny else (128,) * 3
    torch.manual_seed(3)
    vol = F.avg_pool3d(torch.randn(1, 1, size, size, size, device=device), 5, stride=1, padding=2) * 5
    rounds = 2 if args.quick else 3
    random_note = "" if args.model else "; random weights: L2-vs-accurate agreement not meaningful"
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

    ours = build("ours", device, model=args.model).eval()
    monai_upp = build("monai_upp", device, deep_supervision=False).eval()

    def run(net, kind, dt="fp32", level=None, ov=0.5, swb=4, compiled=None):
        model = compiled or net

        def go():
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtypes[dt] or torch.bfloat16,
                                                        enabled=dtypes[dt] is not None):
                return sliding_window_inference(vol, roi, swb, predictor(model, kind, level), overlap=ov,
                                                mode="gaussian")
        return go

    ours.fused = False  # the reference mask comes from the plain path
    with torch.inference_mode():
        reference = run(ours, "ours")().float()
    ours.fused = True
    section = f"{device.type} infer {size}^3 roi{roi[0]}"
    configs = {
        ("monai_upp", "fp32 ov0.5 swb4"): run(monai_upp, "monai_upp", "fp32"),
        ("monai_upp", "bf16 ov0.5 swb4"): run(monai_upp, "monai_upp", "bf16"),
        ("monai_upp", "fp16 ov0.5 swb4"): run(monai_upp, "monai_upp", "fp16"),
        ("ours", "accurate fp32 ov0.5 swb4"): run(ours, "ours", "fp32"),
        ("ours", "accurate bf16 ov0.5 swb4"): run(ours, "ours", "bf16"),
        ("ours", "accurate fp16 ov0.5 swb4"): run(ours, "ours", "fp16"),
        ("ours", "accurate bf16 ov0.25 swb9"): run(ours, "ours", "bf16", ov=0.25, swb=9),
        ("ours", "accurate fp16 ov0.25 swb9"): run(ours, "ours", "fp16", ov=0.25, swb=9),
        ("ours", "fast L2 bf16 ov0.25 swb9"): run(ours, "ours", "bf16", level=2, ov=0.25, swb=9),
        ("ours", "fast L2 fp16 ov0.25 swb9"): run(ours, "ours", "fp16", level=2, ov=0.25, swb=9),
    }
    if device.type == "cpu":  # a dry run: fp16 convolutions have no fast CPU kernel here
        configs = {k: v for k, v in configs.items() if "fp16" not in k[1]}
    if not args.no_compile:
        # 27 windows in batches of 9: one fixed shape, so CUDA graphs ("reduce-overhead") apply.
        compiled = torch.compile(ours, mode="reduce-overhead")
        configs[("ours", "accurate bf16 ov0.25 swb9 compile+graphs")] = run(ours, "ours", "bf16", ov=0.25, swb=9,
                                                                          compiled=compiled)
    outputs = {}

    def keep(key, fn):
        def call():
            outputs[key] = fn()
        return call

    # One call of each first (cuDNN autotuning, compilation); a failing configuration is reported
    # and dropped instead of ending the run.
    for key in list(configs):
        t0 = time.perf_counter()
        try:
            keep(key, configs[key])()
            sync(device)
        except Exception as exc:
            table.add(section=section, model=key[0], variant=key[1], note=f"FAILED {type(exc).__name__}: {str(exc)[:160]}")
            del configs[key]
            continue
        if "compile" in key[1]:
            print(f"   first call of {key[1]} (compilation): {time.perf_counter() - t0:.1f} s", flush=True)
    times = interleaved({k: keep(k, f) for k, f in configs.items()}, rounds, device, warmup=0)
    monai_keys = [k for k in times if k[0] == "monai_upp"]
    monai_best = min(monai_keys, key=lambda k: statistics.median(times[k])) if monai_keys else None
    for key, ts in times.items():
        med = statistics.median(ts)
        vs = ratio(times, monai_best, key) if key[0] == "ours" and monai_best else None
        table.add(section=section, model=key[0], variant=key[1], time=f"{med:.3f} s",
                  vs_monai=vs, agreement=agreement(outputs[key].float(), reference) if key[0] == "ours" else None,
                  note=(f"vs MONAI's fastest, {monai_best[1]}; " if vs else "")
                  + ("agreement with ours plain fp32 ov0.5" if key[0] == "ours" else "")
                  + (random_note if "L2" in key[1] else ""))


# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and variants")
    ap.add_argument("--sections", default=None,
                    help="comma-separated: cpu forward,sliding,trainmem,endtoend; cuda train,infer (default: all)")
    ap.add_argument("--json", default=None, help="write all rows and the machine's details here")
    ap.add_argument("--model", type=Path, default=None, help="a trained unetpp3d model for the inference sections")
    ap.add_argument("--ct", default=str(CT_PATH), help="CT for the CPU sliding-window section")
    ap.add_argument("--overlap", type=float, default=0.25, help="CPU sliding-window overlap")
    ap.add_argument("--sw-batch", type=int, default=2, help="CPU sliding-window batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default mmap thresholds (CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile variants (CUDA)")
    ap.add_argument("--tiny", action="store_true",
                    help="train/infer sections at 32^3 and 64^3: a smoke test of their code, also on the CPU")
    ap.add_argument("--train-rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.train_rss_child:
        return _train_rss_child(args.train_rss_child)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    tuned = device.type == "cpu" and not args.no_malloc_tuning and tune_cpu_allocator()
    info = machine(device)
    info["malloc_tuned"] = tuned
    print(json.dumps(info, indent=1))

    table = Table(args.json, info)
    check_flops(table, device)
    # The CUDA sections also run on the CPU with --tiny: a dry run of their code, not a measurement.
    sections = {"cpu": {"forward": cpu_forward, "sliding": cpu_sliding, "trainmem": cpu_trainmem, "endtoend": cpu_endtoend,
                        "train": cuda_train, "infer": cuda_infer},
                "cuda": {"train": cuda_train, "infer": cuda_infer}}[device.type]
    defaults = ["forward", "sliding", "trainmem", "endtoend"] if device.type == "cpu" else ["train", "infer"]
    wanted = args.sections.split(",") if args.sections else defaults
    for name in wanted:
        if name not in sections:
            raise SystemExit(f"unknown section {name!r} for {device.type}; choose from {', '.join(sections)}")
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        sections[name](table, args)
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)

    info["load_average_end"] = list(os.getloadavg())
    table.print()
    print(f"\nload average at start {info['load_average_start']}, at end {info['load_average_end']}")
    if args.json:
        table.write()
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
