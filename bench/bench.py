#!/usr/bin/env python
"""Time unetpp3d's UNet++ against MONAI's BasicUNetPlusPlus (and BasicUNet), in one process.

    python bench/bench.py --device cpu --quick --json cpu.json      # this machine, a few minutes
    python bench/bench.py --device cpu --json cpu.json              # more rounds, every mode
    python bench/bench.py --device cuda --json gpu.json             # one GPU (not run on one yet)
    python bench/bench.py --device cuda --quick --compile ours      # what `make gpu-check` runs, per section
    python bench/bench.py --device cpu --tiny --quick --compile none --sections train,infer,data   # dry run

Both networks get the same FLOPs: MONAI's features (32, 32, 64, 128, 256, 32) and ours
(32, 32, 64, 128, 256) count the same convolution FLOPs (printed; the run stops if they differ by
more than 5%). Weights are random unless ``--model`` names a trained unetpp3d model or
``--fit-steps`` trains ours on the inference section's phantom first: voxel agreement means
little with random weights, so the notes say so.

Sections (``--sections``), each timed with every contender interleaved round by round, so that
load from other processes hits all of them alike; times are medians, ratios the median of the
per-round ratios:

  CPU  forward    one forward at 64^3, GFLOP/s, against one 3x3x3 convolution (the ceiling)
       sliding    sliding-window inference (roi 96, overlap 0.25) over a CT of ~122x101x112
       trainmem   peak resident memory of one training step, each model in a child process
       endtoend   `unetpp3d infer` on that CT as a file, accurate and fast (L2), in a fresh process
  CUDA train      training step at batch 2, 128^3: fp32/TF32, bf16, fp16, layouts, torch.compile;
                  TFLOP/s, peak GiB, and the convolutions-alone floor of the same step
       infer      sliding-window inference over 256^3 (roi 128), each of ours against the
                  overlap-0.5 fp32 reference of the same mode (speed-up and voxel agreement)
       data       training steps fed by the real loader against the same steps on one batch

Sections record the issue's targets beside their rows (``targets`` in the JSON; ``targets.py``
prints them). The table is printed last; ``--json`` writes every row with the machine, versions
and settings. The CUDA sections live in ``gpu_sections.py``, what all share in ``benchlib.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import (CLASSES, REPO, WIDTHS, Table, agreement, build, check_flops, count_flops, interleaved,
                      machine, predictor, ratio)
from gpu_sections import cuda_data, cuda_infer, cuda_train

from unetpp3d.hardware import autocast_dtype, keep_freed_memory
from unetpp3d.model.network import UNetPlusPlus3D
from unetpp3d.model.portable import ModeNet

CT_PATH = REPO.parent / "shared" / "data" / "abdomen_ct_ts" / "ct.nii.gz"
CT_SHAPE = (122, 101, 112)  # the 3 mm abdominal CT, (x, y, z)
CPU_PER_FLOP_GOAL = 1.4  # issue 17: CPU fp32 forward at least 1.4x MONAI's per FLOP


def tune_cpu_allocator() -> bool:
    """The setting the ``unetpp3d`` command applies at start-up (unetpp3d/hardware.py), here
    for every contender alike."""
    return keep_freed_memory()


# --------------------------------------------------------------------------------------------
# CPU


def cpu_forward(table: Table, args) -> None:
    """One forward at 64^3 (batch 1), inference mode, fp32 and (unless ``--fp32-only``) bf16 autocast."""
    device = torch.device("cpu")
    rounds = 3 if args.quick else 7
    x = torch.randn(1, 1, 64, 64, 64)
    cl = torch.channels_last_3d
    width = WIDTHS.ours[0]
    nets = {k: build(k, device).eval() for k in ("ours", "monai_upp", "monai_unet")}
    # The reference path as the code ran before the fused one existed: contiguous weights.
    reference = build("ours", device).eval().to(memory_format=torch.contiguous_format)
    reference.fused = False
    monai_cl = build("monai_upp", device).eval().to(memory_format=cl)
    conv = torch.nn.Conv3d(width, width, 3, padding=1, bias=False).to(memory_format=cl)
    xc = torch.randn(1, width, 64, 64, 64).contiguous(memory_format=cl)

    fns = {
        f"conv3x3 {width}->{width}": lambda: conv(xc),
        "monai_upp": lambda: nets["monai_upp"](x),
        "monai_upp channels_last": lambda: monai_cl(x.contiguous(memory_format=cl)),
        "monai_unet": lambda: nets["monai_unet"](x),
        "ours reference": lambda: reference(x),
        "ours fused": lambda: nets["ours"](x),
    }
    with torch.no_grad():
        flops = {k: count_flops(f) for k, f in fns.items()}
    for dtype in (torch.float32,) if args.fp32_only else (torch.float32, torch.bfloat16):
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
            if name == "ours fused" and tag == "fp32":
                table.target("CPU fp32 forward per FLOP vs MONAI (64^3)", f">= {CPU_PER_FLOP_GOAL}", f"{vs:.2f}x",
                             vs >= CPU_PER_FLOP_GOAL, f"{torch.get_num_threads()} threads; vs {best_monai}; "
                             f"{rounds} rounds")


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
        window = ModeNet(net, level) if kind == "ours" else predictor(net, kind)

        def go():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return sliding_window_inference(vol, roi, swb, window, overlap=ov, mode="gaussian").float()
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
        net = UNetPlusPlus3D(1, 2, WIDTHS.ours, deep_supervision=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and variants")
    ap.add_argument("--sections", default=None,
                    help="comma-separated: cpu forward,sliding,trainmem,endtoend; cuda train,infer,data (default: all)")
    ap.add_argument("--json", default=None, help="write all rows, the targets and the machine's details here")
    ap.add_argument("--model", type=Path, default=None, help="a trained unetpp3d model for the inference sections")
    ap.add_argument("--fit-steps", type=int, default=0,
                    help="infer section: first train ours this many steps on the phantom it then segments")
    ap.add_argument("--ct", default=str(CT_PATH), help="CT for the CPU sliding-window section")
    ap.add_argument("--overlap", type=float, default=0.25, help="CPU sliding-window overlap")
    ap.add_argument("--sw-batch", type=int, default=2, help="CPU sliding-window batch")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--no-malloc-tuning", action="store_true", help="keep glibc's default mmap thresholds (CPU)")
    ap.add_argument("--compile", choices=["all", "ours", "none"], default="all",
                    help="torch.compile variants: of both networks, of ours only, or none")
    ap.add_argument("--no-compile", dest="compile", action="store_const", const="none", help="= --compile none")
    ap.add_argument("--fp32-only", action="store_true", help="CPU forward section: fp32 rows only")
    ap.add_argument("--tiny", action="store_true",
                    help="train/infer/data sections at 32^3-64^3 and 1/8 of the widths: a dry run of their code, "
                         "also on the CPU; no figure it prints is a measurement")
    ap.add_argument("--train-rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.tiny:
        WIDTHS.shrink(8)
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
    info["tiny"] = args.tiny
    print(json.dumps(info, indent=1))

    table = Table(args.json, info)
    check_flops(table, device)
    # The CUDA sections also run on the CPU with --tiny: a dry run of their code, not a measurement.
    cuda_sections = {"train": cuda_train, "infer": cuda_infer, "data": cuda_data}
    sections = {"cpu": {"forward": cpu_forward, "sliding": cpu_sliding, "trainmem": cpu_trainmem,
                        "endtoend": cpu_endtoend, **cuda_sections},
                "cuda": cuda_sections}[device.type]
    defaults = ["forward", "sliding", "trainmem", "endtoend"] if device.type == "cpu" else list(cuda_sections)
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
