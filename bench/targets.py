#!/usr/bin/env python
"""Print the issue's targets against what a run measured: one short table, the last thing `make gpu-check` prints.

    python bench/targets.py OUT/bench_*.json [--pytest OUT/pytest_gpu.xml] [--steps OUT/steps.tsv]

Reads the ``targets`` that bench.py's sections record in their JSON files (a figure recorded
twice keeps its last value), the JUnit XML of ``pytest -m gpu`` and the steps file that
gpu_check.sh writes (step, exit status, seconds). Targets of a section that did not finish show
as "not measured". A run on the CPU or with ``--tiny`` is labelled a dry run: its figures come
from tiny networks on the CPU and measure nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# Every figure issue 17 asks for, in the order printed, with its goal: a section that never
# recorded one shows "not measured" rather than silently leaving it out.
EXPECTED = [
    ("equal FLOPs, ours / MONAI UNet++", "within 5%"),
    ("train step / convolutions alone", "<= 1.25"),
    ("train peak memory / MONAI's", "<= 0.60"),
    ("torch.compile, ours bf16 training step", "report"),
    ("inference, accurate vs MONAI's best", ">= 3x, agreement >= 0.995"),
    ("inference, fast L2 vs MONAI's best", ">= 6x, agreement >= 0.995"),
    ("data: step rate with loading / compute only", ">= 0.90"),
    ("CPU fp32 forward per FLOP vs MONAI", ">= 1.4"),
]


def pytest_summary(path: Path) -> tuple[str, bool | None, str]:
    """``(measured, met, note)`` from a JUnit XML file of ``pytest -m gpu``."""
    if not path.is_file():
        return "no report", False, f"{path.name} missing: pytest did not finish (see its log)"
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    failed = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    measured = f"{passed} passed, {count['failures'] + count['errors']} failed, {count['skipped']} skipped"
    met = None if passed == 0 and not failed else not failed and count["skipped"] == 0
    return measured, met, ("failed: " + ", ".join(failed[:4]) + (" ..." if len(failed) > 4 else "")) if failed else ""


def collect(paths: list[Path]) -> tuple[dict[str, dict], list[dict]]:
    targets: dict[str, dict] = {}
    machines = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:  # a run killed while rewriting its file
            continue
        machines.append(data.get("machine") or {})
        for target in data.get("targets") or []:
            targets[target["figure"]] = target
    return targets, machines


def _mark(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "NO"


def render(targets: dict[str, dict], machines: list[dict], tests: tuple[str, bool | None, str] | None,
           steps: list[list[str]]) -> str:
    rows = []
    if tests is not None:
        rows.append(["pytest -m gpu", "all pass", tests[0], _mark(tests[1]), tests[2]])
    seen = set()
    for name, goal in EXPECTED:
        found = [t for figure, t in targets.items() if name in figure]
        for t in found:
            rows.append([t["figure"], t["goal"], t["measured"], _mark(t["met"]), t.get("note", "")])
            seen.add(t["figure"])
        if not found:
            rows.append([name, goal, "not measured", "NO", "its section did not run or did not finish"])
    rows += [[t["figure"], t["goal"], t["measured"], _mark(t["met"]), t.get("note", "")]
             for figure, t in targets.items() if figure not in seen]
    gpus = sorted({m["gpu"] for m in machines if m.get("gpu")})
    dry = any(m.get("tiny") for m in machines) or not gpus
    head = ["figure", "target", "measured", "met", "note"]
    width = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head[:-1])]
    lines = []
    if dry:
        lines.append("DRY RUN (CPU or --tiny): tiny networks on the CPU; no figure below is a measurement")
    commit = next((m.get("commit") for m in machines if m.get("commit")), "unknown")
    lines.append(f"card: {', '.join(gpus) or 'none'}; commit {commit}; "
                 f"torch {next((m.get('torch') for m in machines if m.get('torch')), '?')}")
    if steps:
        lines.append("steps: " + ", ".join(f"{s[0]} {'ok' if s[1] == '0' else 'exit ' + s[1]} {s[2]} s"
                                          for s in steps if len(s) >= 3))
    lines.append("  ".join(h.ljust(w) for h, w in zip(head, width)) + "  note")
    lines.append("  ".join("-" * w for w in width) + "  ----")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, width)) + "  " + r[-1][:120] for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="*", type=Path, help="bench.py --json files")
    ap.add_argument("--pytest", type=Path, default=None, help="JUnit XML of pytest -m gpu")
    ap.add_argument("--steps", type=Path, default=None, help="gpu_check.sh's steps file")
    args = ap.parse_args(argv)
    targets, machines = collect(args.json)
    tests = pytest_summary(args.pytest) if args.pytest else None
    steps = [line.split("\t") for line in args.steps.read_text().splitlines()] \
        if args.steps and args.steps.is_file() else []
    print(render(targets, machines, tests, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
