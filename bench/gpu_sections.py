"""The CUDA sections of bench.py: training step, 256^3 inference, and the data pipeline's rate.

Each records the issue's targets (``Table.target``) beside its rows. With ``--device cpu
--tiny`` they run at tiny widths and sizes on the CPU: a dry run of the code, not a measurement.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from benchlib import CLASSES, Table, agreement, as_list, build, count_flops, interleaved, predictor, ratio, sync

from unetpp3d.model.portable import ModeNet

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_TRAIN = "bf16 reference"  # the variant `unetpp3d train` runs on a GPU (model.network.fused_pays)
AGREEMENT_GOAL = 0.995  # issue 17: masks of the optimised paths against the fp32 overlap-0.5 reference


def _autocast(device: torch.device, dt: str):
    return torch.autocast(device.type, dtype=DTYPES[dt] or torch.bfloat16, enabled=DTYPES[dt] is not None)


def _compile(module, device: torch.device, mode: str | None = None):
    """torch.compile; on the CPU (a dry run) with the eager backend, which checks the graph capture
    without spending minutes in code generation."""
    return torch.compile(module, mode=mode) if device.type == "cuda" else torch.compile(module, backend="eager")


def _prepare(kind: str, net, layout: str, checkpointing: bool):
    """Put a fresh network in the layout a variant names: ``channels_last``, ``ncdhw`` or, for ours,
    ``reference`` (the plain path: modules only, InstanceNorm3d instead of the fused group norm)."""
    if kind == "ours":
        net.checkpointing = checkpointing
        net.fused = layout != "reference"
        net.channels_last = layout == "channels_last"
        if layout != "channels_last":
            net = net.to(memory_format=torch.contiguous_format)
    elif layout == "channels_last":
        net = net.to(memory_format=torch.channels_last_3d)
    return net


# --------------------------------------------------------------------------------------------
# training step


def cuda_train(table: Table, args) -> None:
    """Training step at batch 2, 128^3, 3 classes, deep supervision; AdamW; cross-entropy per head."""
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    batch, size = 2, (32 if args.tiny else 128)
    iters = 2 if args.tiny else 5 if args.quick else 15
    x = torch.randn(batch, 1, size, size, size, device=device)
    y = torch.randint(0, CLASSES, (batch, size, size, size), device=device)

    # Most telling first, so that a run cut short by a time limit still has them (--json is
    # rewritten after every row). The first is what `unetpp3d train` runs on a GPU: the plain path
    # in NCDHW (unetpp3d.model.network.fused_pays, from the H200 run of 2026-11-27 in RESULTS.md).
    variants = [  # (model, dtype, layout, compile, checkpointing)
        ("ours", "bf16", "reference", False, False),
        ("monai_upp", "bf16", "ncdhw", False, False),
        ("ours", "bf16", "ncdhw", False, False),
        ("ours", "fp16", "reference", False, False),
        ("monai_upp", "fp16", "ncdhw", False, False),
        ("ours", "fp32", "reference", False, False),
        ("monai_upp", "fp32", "ncdhw", False, False),
        ("ours", "bf16", "channels_last", False, False),
        ("ours", "bf16", "channels_last", False, True),
        ("monai_upp", "bf16", "channels_last", False, False),
        ("monai_unet", "bf16", "ncdhw", False, False),
    ]
    if args.compile in ("ours", "all"):
        variants.insert(3, ("ours", "bf16", "reference", True, False))
    if args.compile == "all":
        variants += [("monai_upp", "bf16", "ncdhw", True, False), ("ours", "bf16", "channels_last", True, True)]
    if args.quick:
        variants = [v for v in variants if v[0] != "monai_unet"]
    if device.type == "cpu":  # a dry run: fp16 convolutions have no fast CPU kernel here
        variants = [v for v in variants if v[1] != "fp16"]

    section = f"{device.type} train b{batch} {size}^3"
    results: dict[tuple, dict] = {}
    for kind, dt, layout, compiled, ckpt in variants:
        name = f"{dt} {layout}{' compile' if compiled else ''}{' checkpointing' if ckpt else ''}"
        net = model = opt = None
        try:
            net = _prepare(kind, build(kind, device).train(), layout, ckpt)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
            scaler = torch.amp.GradScaler(device.type, enabled=dt == "fp16")
            model = _compile(net, device) if compiled else net
            xin = x.contiguous(memory_format=torch.channels_last_3d) if layout == "channels_last" and kind != "ours" else x

            def step():
                opt.zero_grad(set_to_none=True)
                with _autocast(device, dt):
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
            with _autocast(device, dt):
                flops = count_flops(lambda: sum(h.float().sum() for h in as_list(net(xin))).backward())
            opt.zero_grad(set_to_none=True)
            floor = conv_floor(net, xin, DTYPES[dt], device) if not compiled else None
        except Exception as exc:  # one failing variant (OOM, a compile error) must not end the run
            table.add(section=section, model=kind, variant=name, note=f"FAILED {type(exc).__name__}: {str(exc)[:160]}")
            continue
        finally:
            model = net = opt = None  # free the variant's memory before the next
            if device.type == "cuda":
                torch.cuda.empty_cache()
        med = statistics.median(ts)
        compile_s = max(first - 2 * med, 0.0) if compiled else None
        results[(kind, name)] = dict(time=med, peak=peak, floor=floor, compile_s=compile_s)
        note = f"first 2 steps {first:.1f} s" + (f" (compile ~{compile_s:.0f} s)" if compiled else "")
        if floor:
            note += f"; conv floor {floor * 1e3:.0f} ms, step/floor {med / floor:.2f}"
        table.add(section=section, model=kind, variant=name, time=f"{med * 1e3:.0f} ms",
                  rate=f"{flops / med / 1e12:.1f} TFLOP/s", peak_gib=peak, note=note,
                  time_s=med, floor_s=floor, compile_s=compile_s)
    # ours against MONAI's best configuration of the same precision, time and memory
    for (kind, name), r in results.items():
        if kind != "ours":
            continue
        same = [v for (k, n), v in results.items() if k == "monai_upp" and n.split()[0] == name.split()[0]
                and "compile" not in n]
        if same:
            best_t = min(v["time"] for v in same)
            best_m = min((v["peak"] for v in same if v["peak"]), default=None)
            table.add(section=section, model="ours/monai_upp", variant=name, vs_monai=best_t / r["time"],
                      peak_gib=r["peak"] / best_m if best_m and r["peak"] else None,
                      note=f"speed-up over MONAI's fastest {name.split()[0]} (not compiled); peak_gib column = memory ratio")
    _train_targets(table, results, f"bf16, {size}^3 x{batch}")


def _train_targets(table: Table, results: dict, setting: str) -> None:
    default = results.get(("ours", DEFAULT_TRAIN))  # what `unetpp3d train` runs on a GPU
    if not default:
        table.target(f"train step / convolutions alone ({setting})", "<= 1.25", "not measured", False,
                     "the default variant failed or did not run")
        return
    ours_bf16 = {n: r for (k, n), r in results.items() if k == "ours" and n.startswith("bf16")}
    if default["floor"]:
        best_floor = min(r["floor"] for r in ours_bf16.values() if r["floor"])
        fastest = min(ours_bf16, key=lambda n: ours_bf16[n]["time"])
        measured = default["time"] / best_floor
        table.target(f"train step / convolutions alone ({setting})", "<= 1.25", f"{measured:.2f}", measured <= 1.25,
                     f"default ({DEFAULT_TRAIN}) {default['time'] * 1e3:.0f} ms, floor {best_floor * 1e3:.0f} ms "
                     f"(fastest layout's); fastest of ours: {fastest}, {ours_bf16[fastest]['time'] * 1e3:.0f} ms")
    monai_peaks = [r["peak"] for (k, n), r in results.items() if k == "monai_upp" and n.startswith("bf16") and r["peak"]]
    if default["peak"] is None:
        table.target(f"train peak memory / MONAI's ({setting})", "<= 0.60", "not measured on the CPU", None,
                     "the peak is read from CUDA's allocator")
    elif monai_peaks:
        lowest = min((n for n in ours_bf16 if ours_bf16[n]["peak"]), key=lambda n: ours_bf16[n]["peak"])
        measured = default["peak"] / min(monai_peaks)
        table.target(f"train peak memory / MONAI's ({setting})", "<= 0.60", f"{measured:.2f}", measured <= 0.60,
                     f"default {default['peak']:.1f} GiB, MONAI {min(monai_peaks):.1f} GiB; lowest of ours: {lowest}, "
                     f"{ours_bf16[lowest]['peak'] / min(monai_peaks):.2f}")
    compiled = results.get(("ours", f"{DEFAULT_TRAIN} compile"))
    if compiled:
        table.target("torch.compile, ours bf16 training step", "report", f"{default['time'] * 1e3:.0f} -> "
                     f"{compiled['time'] * 1e3:.0f} ms ({default['time'] / compiled['time']:.2f}x)", None,
                     f"compilation ~{compiled['compile_s']:.0f} s in the first two steps")


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


# --------------------------------------------------------------------------------------------
# 256^3 inference


def phantom_volume(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic abdomen (unetpp3d.synth) as ``(1, 1, s, s, s)`` intensities scaled to about [-1, 1]
    and ``(1, s, s, s)`` labels: 0 air, 1 body, 2 liver."""
    import numpy as np

    from unetpp3d.synth.phantom import make_phantom

    hu, liver, *_ = make_phantom("liver", seed=3, size=size)
    label = np.where(liver > 0, 2, np.where(hu > -500, 1, 0)).astype(np.int64)
    image = torch.from_numpy(np.clip(hu, -1000, 1000).astype(np.float32) / 1000.0)
    return image[None, None].to(device), torch.from_numpy(label)[None].to(device)


def fit(net, image: torch.Tensor, label: torch.Tensor, steps: int, patch: int) -> float:
    """Train ``net`` for ``steps`` AdamW steps (bf16 on CUDA) on random patches of the volume it
    will segment, so that its masks have few voxels near a tie; returns the last loss."""
    from unetpp3d.training.loss import DeepSupervisionLoss

    device = image.device
    loss_fn = DeepSupervisionLoss(CLASSES)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    net.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        crops = []
        for _ in range(2):
            a, b, c = (int(torch.randint(0, s - patch + 1, (1,), generator=generator)) for s in image.shape[2:])
            crops.append((image[0, :, a:a + patch, b:b + patch, c:c + patch],
                          label[:, a:a + patch, b:b + patch, c:c + patch]))
        x, y = torch.stack([c[0] for c in crops]), torch.stack([c[1] for c in crops])
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            heads = net(x)
        loss = loss_fn(heads, y)
        loss.backward()
        opt.step()
    net.eval()
    return float(loss.detach())


def cuda_infer(table: Table, args) -> None:
    """Sliding-window inference over a 256^3 volume, roi 128, gaussian blending, each of ours against
    the fp32 overlap-0.5 reference of the same mode (plain path)."""
    from monai.inferers import sliding_window_inference

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    size, roi = (64, (32,) * 3) if args.tiny else (256, (128,) * 3)
    rounds = 2 if args.quick else 3
    ours = build("ours", device, model=args.model).eval()
    monai_upp = build("monai_upp", device, deep_supervision=False).eval()
    if args.fit_steps and not args.model:
        vol, label = phantom_volume(size, device)
        t0 = time.perf_counter()
        last = fit(ours, vol, label, args.fit_steps, roi[0])
        model_note = f"fitted {args.fit_steps} steps on the phantom it segments (loss {last:.3f})"
        print(f"   fitted ours for {args.fit_steps} steps in {time.perf_counter() - t0:.0f} s, last loss {last:.3f}")
    else:
        torch.manual_seed(3)
        vol = F.avg_pool3d(torch.randn(1, 1, size, size, size, device=device), 5, stride=1, padding=2) * 5
        model_note = f"model {args.model}" if args.model else "random weights: agreement says little"

    def run(net, kind, dt="fp32", ov=0.5, swb=4):
        def go():
            with torch.inference_mode(), _autocast(device, dt):
                return sliding_window_inference(vol, roi, swb, predictor(net, kind), overlap=ov, mode="gaussian")
        return go

    accurate, fast = ModeNet(ours, None), ModeNet(ours, 2)
    ours.fused = False  # the references come from the plain path
    with torch.inference_mode():
        references = {"accurate": run(accurate, "ours")().argmax(1), "fast L2": run(fast, "ours")().argmax(1)}
    ours.use_device(device)  # then the path `unetpp3d infer` takes here: plain on CUDA, fused on the CPU
    other = "channels_last" if not ours.fused else "reference"  # the other path, for comparison
    other_path = ModeNet(_prepare("ours", build("ours", device, model=args.model).eval(), other, False))
    other_path.net.load_state_dict(ours.state_dict())
    section = f"{device.type} infer {size}^3 roi{roi[0]}"
    configs = {
        ("monai_upp", "fp32 ov0.5 swb4"): run(monai_upp, "monai_upp", "fp32"),
        ("monai_upp", "bf16 ov0.5 swb4"): run(monai_upp, "monai_upp", "bf16"),
        ("monai_upp", "fp16 ov0.5 swb4"): run(monai_upp, "monai_upp", "fp16"),
        ("ours", "accurate fp32 ov0.5 swb4"): run(accurate, "ours", "fp32"),
        ("ours", "accurate bf16 ov0.5 swb4"): run(accurate, "ours", "bf16"),
        ("ours", "accurate fp16 ov0.5 swb4"): run(accurate, "ours", "fp16"),
        ("ours", f"accurate bf16 ov0.5 swb4 {other} path"): run(other_path, "ours", "bf16"),
        ("ours", "accurate bf16 ov0.25 swb9"): run(accurate, "ours", "bf16", ov=0.25, swb=9),
        ("ours", "accurate fp16 ov0.25 swb9"): run(accurate, "ours", "fp16", ov=0.25, swb=9),
        ("ours", "fast L2 bf16 ov0.5 swb4"): run(fast, "ours", "bf16"),
        ("ours", "fast L2 bf16 ov0.25 swb9"): run(fast, "ours", "bf16", ov=0.25, swb=9),
        ("ours", "fast L2 fp16 ov0.25 swb9"): run(fast, "ours", "fp16", ov=0.25, swb=9),
    }
    if device.type == "cpu":  # a dry run: fp16 convolutions have no fast CPU kernel here
        configs = {k: v for k, v in configs.items() if "fp16" not in k[1]}
    if args.compile != "none":
        # 27 windows in batches of 9: one fixed shape, so CUDA graphs ("reduce-overhead") apply.
        configs[("ours", "accurate bf16 ov0.25 swb9 compile+graphs")] = run(
            _compile(accurate, device, "reduce-overhead"), "ours", "bf16", ov=0.25, swb=9)
        configs[("ours", "fast L2 bf16 ov0.25 swb9 compile+graphs")] = run(
            _compile(fast, device, "reduce-overhead"), "ours", "bf16", ov=0.25, swb=9)
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
    measured = {}
    for key, ts in times.items():
        med = statistics.median(ts)
        vs = ratio(times, monai_best, key) if key[0] == "ours" and monai_best else None
        mode = "fast L2" if "L2" in key[1] else "accurate"
        agree = agreement(outputs[key], references[mode]) if key[0] == "ours" else None
        if key[0] == "ours":
            measured[key] = (vs, agree, mode)
        table.add(section=section, model=key[0], variant=key[1], time=f"{med:.3f} s", vs_monai=vs, agreement=agree,
                  time_s=med, note=(f"vs MONAI's fastest, {monai_best[1]}; " if vs else "")
                  + (f"agreement with ours {mode} plain fp32 ov0.5; {model_note}" if key[0] == "ours" else ""))
    for mode, goal in (("accurate", 3.0), ("fast L2", 6.0)):
        ok = {k: v for k, v in measured.items() if v[2] == mode and v[0] is not None and v[1] >= AGREEMENT_GOAL}
        figure = f"{size}^3 inference, {mode} vs MONAI's best"
        if not ok:
            table.target(figure, f">= {goal:g}x, agreement >= {AGREEMENT_GOAL}", "no configuration agrees", False,
                         model_note)
            continue
        best = max(ok, key=lambda k: ok[k][0])
        table.target(figure, f">= {goal:g}x, agreement >= {AGREEMENT_GOAL}", f"{ok[best][0]:.2f}x", ok[best][0] >= goal,
                     f"{best[1]}, agreement {ok[best][1]:.4f}, against {monai_best[1] if monai_best else '?'}; "
                     + model_note)


# --------------------------------------------------------------------------------------------
# data pipeline


def cuda_data(table: Table, args) -> None:
    """Training steps with the real loader (phantoms on disk, cached, augmented by worker
    processes) against the same steps on one batch held in memory: the GPU should never wait."""
    from unetpp3d.config import Config, DataConfig, Preprocessing
    from unetpp3d.data.loader import TrainLoader, case_dicts
    from unetpp3d.data.manifest import load_manifest
    from unetpp3d.data.transforms import make_dataset, train_transforms
    from unetpp3d.synth.anatomy import FOV_MM
    from unetpp3d.synth.phantom import write_dataset
    from unetpp3d.training.loss import DeepSupervisionLoss
    from unetpp3d.training.trainer import Trainer

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    size, patch = (48, 32) if args.tiny else (160, 128)
    steps, warm = (3, 2) if args.tiny else (12 if args.quick else 20, 4)
    cores = os.cpu_count() or 1
    default_workers = DataConfig().num_workers
    workers = [min(2, cores)] if args.tiny else sorted({min(default_workers, cores), max(1, cores - 4)})
    cfg = Config(task="liver")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_dataset("liver", 6, Path(tmp) / "data", seed=0, size=size)
        prep = Preprocessing(task="liver", labels={"0": "background", "1": "liver"},
                             target_spacing=[FOV_MM["liver"] / size] * 3, intensity_range=[-150.0, 250.0],
                             intensity_stats=[60.0, 40.0], patch_size=[patch] * 3)
        # As `unetpp3d train` builds it (make_train_loader), once for every worker count.
        dataset = make_dataset(case_dicts(load_manifest(manifest).training), train_transforms(prep, cfg.data),
                               "memory", num_workers=cores)
        net = build("ours", device, classes=2).train()
        section = f"{device.type} data b2 {patch}^3"
        rates = {}
        for n_workers in [0, *workers]:  # 0: one batch is loaded, and the timed steps reuse it
            loader = TrainLoader(dataset, 2, cfg.data.samples_per_volume, steps + warm, num_workers=n_workers,
                                 pin_memory=device.type == "cuda")
            trainer = Trainer(cfg=cfg, prep=prep, net=net, model=net, loss_fn=DeepSupervisionLoss(2),
                              optimizer=torch.optim.AdamW(net.parameters(), lr=1e-4), scheduler=None,
                              scaler=torch.amp.GradScaler(device.type, enabled=False), train_loader=loader,
                              val_loader=[], device=device, folder=Path(tmp), split={}, log=None,
                              amp=torch.bfloat16 if device.type == "cuda" else None)
            loader.set_epoch(0)
            batches = iter(loader)
            if n_workers == 0:
                batches = iter([next(batches)] * (steps + warm))
            t0 = time.perf_counter()
            for i, batch in enumerate(batches):
                if i == warm:  # past the workers' start and the first batches
                    sync(device)
                    t0 = time.perf_counter()
                trainer.train_step(batch)  # the trainer's own step: copy, autocast, loss, clip, optimiser
            sync(device)
            rates[n_workers] = steps / (time.perf_counter() - t0)
            table.add(section=section, model="ours",
                      variant="compute only (one batch in memory)" if n_workers == 0 else f"loader, {n_workers} workers",
                      time=f"{1e3 / rates[n_workers]:.0f} ms", rate=f"{rates[n_workers]:.2f} steps/s",
                      time_s=1 / rates[n_workers],
                      note=f"{steps} steps after {warm}; {size}^3 phantoms cached in memory, training augmentation; "
                           f"{cores} CPU cores")
            del batches, loader, trainer
    for n_workers in workers:
        share = rates[n_workers] / rates[0]
        table.target(f"data: step rate with loading / compute only ({n_workers} workers)", ">= 0.90", f"{share:.2f}",
                     share >= 0.90, f"{rates[n_workers]:.2f} vs {rates[0]:.2f} steps/s"
                     + ("; the config's default num_workers" if n_workers == default_workers else ""))
