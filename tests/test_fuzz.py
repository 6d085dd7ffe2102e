"""Fuzz: corrupted image files and manifests end in a UserError (or a correct read), never worse.

Every image case starts from a small valid volume in one of the readers' formats (NIfTI ``.nii.gz``
and ``.nii``, NRRD raw and gzip, MetaImage raw and zlib, a DICOM series folder and a single
DICOM file) and damages it: truncation, bit flips, overwritten header bytes, spliced junk, header
fields set to odd values (NIfTI binary fields, NRRD/MHA text fields, DICOM element lengths),
huge declared sizes on tiny data, or a file of random bytes. :func:`read_image` must then either
refuse the file with a one-line :class:`UserError` naming it, or return an array that matches the
geometry it reports. Any other exception fails the test, as does an example slower than the
deadline (30 s); a hang longer than ``HANG_S`` kills the run with a traceback (``faulthandler``).

The reader runs in-process, so a segfault inside ITK would kill pytest itself. The first test
therefore runs a random sample of corrupted files through ``unetpp3d check`` in a subprocess,
where a crash shows as a signal exit code; the in-process fuzz is skipped when it saw one.

Counts of the cases that ran are printed at the end of the module ("fuzz summary").

The quick tests always run; the ``slow`` ones run many more examples (about 60 s in all). Both
are reproducible, so that CI fails only on a change: the slow ones draw from ``FUZZ_SEED``.
``UNETPP3D_FUZZ_SEED=random`` explores new cases each run (the seed is printed with the summary;
set it to that number to replay a failure).
"""

from __future__ import annotations

import faulthandler
import gzip
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from factories import ONE_THREAD, write_dicom_series
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from unetpp3d.data.manifest import load_manifest, split_cases
from unetpp3d.errors import UserError
from unetpp3d.imageio.readers import read_image

# A read that takes longer than this is a hang: faulthandler dumps the stacks and exits.
HANG_S = 120
# A generous deadline per example: reads take milliseconds, but the machine may be shared.
SETTINGS = dict(deadline=timedelta(seconds=30), database=None, suppress_health_check=list(HealthCheck),
                derandomize=False)
QUICK = dict(SETTINGS, derandomize=True)  # the always-on run is the same every time
_SEED_SETTING = os.environ.get("UNETPP3D_FUZZ_SEED", "20261127")
FUZZ_SEED = random.randrange(2**32) if _SEED_SETTING == "random" else int(_SEED_SETTING)
QUICK_IMAGES, SLOW_IMAGES = 25, 150  # examples per variant
QUICK_MANIFESTS, SLOW_MANIFESTS = 100, 1000

VOLUME = ((np.arange(8 * 9 * 10).reshape(8, 9, 10) % 251) - 100).astype(np.int16)
FILE_VARIANTS = {  # name: (suffix, compressed)
    "nii.gz": (".nii.gz", True),
    "nii": (".nii", False),
    "nrrd": (".nrrd", False),
    "nrrd-gzip": (".nrrd", True),
    "mha": (".mha", False),
    "mha-zlib": (".mha", True),
}
DICOM_VARIANTS = ("dicom-series", "dicom-file")
VARIANTS = (*FILE_VARIANTS, *DICOM_VARIANTS)

# Odd values for text header fields (NRRD, MetaImage) and sizes to declare on tiny data.
TEXT_VALUES = ["0", "-1", "1", "3", "4", "11", "100", "2048", "-5 -5 -5", "", "abc", "nan", "inf", "1e308",
               "2048 2048 2048", "99999999999 1 1", "4294967297 2 2", "8 9", "8 9 10 11", "0 9 10",
               "MET_DOUBLE", "MET_UCHAR_ARRAY", "MET_STRING", "MET_OTHER", "double", "uchar", "block", "float",
               "gzip", "bzip2", "hex", "text", "raw", "True", "False", "LOCAL", "LIST", "missing.raw",
               "(nan,0,0) (0,1,0) (0,0,1)", "(0,0,0) (0,0,0) (0,0,0)", "none", "1 0", "\x00\xff"]
HUGE_SIZES = [(2048, 2048, 2048), (65535, 65535, 65535), (1000, 1000, 1000), (100000, 100000, 100000),
              (32767, 1, 1), (400, 400, 400), (2**31 - 1, 2, 2)]
# NIfTI-1 header fields: (offset, struct format).
NIFTI_FIELDS = [(0, "i"), (40, "h"), (42, "h"), (44, "h"), (46, "h"), (48, "h"), (50, "h"), (52, "h"), (54, "h"),
                (70, "h"), (72, "h"), (76, "f"), (80, "f"), (84, "f"), (88, "f"), (108, "f"), (112, "f"),
                (116, "f"), (252, "h"), (254, "h"), (256, "f"), (260, "f"), (280, "f"), (344, "4s")]
NIFTI_VALUES = {"h": [0, -1, 1, 2, 3, 4, 7, 8, 16, 64, 128, 255, 256, 511, 768, 1024, 1536, 2048, 2304, 32767,
                      -32768],
                "i": [0, 348, 540, -1, 2**31 - 1],
                "f": [0.0, -1.0, 1.0, 1e38, float("nan"), float("inf"), 352.0, 1e-30, 3.5, 1e5],
                "4s": [b"n+1\x00", b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00"]}
DICOM_LENGTHS = [0, 1, 3, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000002, 0xFFFFFFFE, 0xFFFFFFFF]

TALLY: Counter = Counter()


@pytest.fixture(scope="module", autouse=True)
def fuzz_summary(request, record_testsuite_property):
    """Print how many cases ran, per kind and outcome, when the module ends (and record it in JUnit XML)."""
    yield
    if not TALLY:
        return
    for (kind, outcome), n in sorted(TALLY.items()):
        record_testsuite_property(f"fuzz {kind} {outcome}", n)
    lines = [f"  {kind}: {sum(v for (k, _), v in TALLY.items() if k == kind)} cases ("
             + ", ".join(f"{outcome} {n}" for (k, outcome), n in sorted(TALLY.items()) if k == kind) + ")"
             for kind in sorted({k for k, _ in TALLY})]
    text = f"fuzz summary: {sum(TALLY.values())} cases (slow runs: UNETPP3D_FUZZ_SEED={FUZZ_SEED})\n" + "\n".join(lines)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # teardown output is captured otherwise
            reporter.write_line("")
            reporter.write_line(text)
    else:
        print(text)
    TALLY.clear()


# ---------------------------------------------------------------------------------------------
# Seed files and corruptions
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, dict[str, bytes]]:
    """variant -> {relative file name: bytes} of one valid small volume."""
    folder = tmp_path_factory.mktemp("seeds")
    out: dict[str, dict[str, bytes]] = {}
    for name, (suffix, compressed) in FILE_VARIANTS.items():
        image = sitk.GetImageFromArray(VOLUME.transpose(2, 1, 0))
        image.SetSpacing((0.7, 0.8, 1.5))
        image.SetOrigin((1.0, -2.0, 3.0))
        path = folder / f"{name.replace('-', '_')}{suffix}"
        sitk.WriteImage(image, str(path), useCompression=compressed)
        np.testing.assert_array_equal(read_image(path)[0], VOLUME)  # the seed itself is valid
        out[name] = {path.name: path.read_bytes()}
    series = write_dicom_series(folder / "series", n=4)
    assert read_image(series)[1].size == (8, 8, 4)
    out["dicom-series"] = {p.name: p.read_bytes() for p in sorted(series.iterdir())}
    # A multi-frame file: one DICOM file holding a whole volume (GDCM writes 3D only as unsigned).
    image = sitk.GetImageFromArray((VOLUME + 100).astype(np.uint16).transpose(2, 1, 0))
    image.SetSpacing((0.7, 0.8, 1.5))
    sitk.WriteImage(image, str(folder / "volume.dcm"))
    np.testing.assert_array_equal(read_image(folder / "volume.dcm")[0], VOLUME + 100)
    data = (folder / "volume.dcm").read_bytes()
    assert data[_dicom_elements(data)[-1]:][:4] == b"\xe0\x7f\x10\x00"  # the walk reaches the pixel data
    out["dicom-file"] = {"volume.dcm": data}
    return out


def _text_header_end(data: bytes) -> int:
    if data.startswith(b"NRRD"):
        end = data.find(b"\n\n")
        return end if end >= 0 else min(len(data), 512)
    end = data.find(b"ElementDataFile")
    return data.find(b"\n", end) if end >= 0 else min(len(data), 512)


def _set_text_field(data: bytes, index: int, value: str) -> bytes:
    end = _text_header_end(data)
    lines = data[:end].split(b"\n")
    keyed = [i for i, line in enumerate(lines) if b": " in line or b" = " in line]
    if not keyed:
        return data
    i = keyed[index % len(keyed)]
    sep = b": " if b": " in lines[i] else b" = "
    lines[i] = lines[i].split(sep)[0] + sep + value.encode("latin-1")
    return b"\n".join(lines) + data[end:]


def _set_text_sizes(data: bytes, sizes: tuple[int, ...]) -> bytes:
    text = " ".join(map(str, sizes)).encode()
    end = _text_header_end(data)
    lines = data[:end].split(b"\n")
    for i, line in enumerate(lines):
        if line.startswith((b"sizes:", b"DimSize")):
            lines[i] = line.split(b":" if line.startswith(b"sizes") else b"=")[0] + (
                b": " if line.startswith(b"sizes") else b"= ") + text
    return b"\n".join(lines) + data[end:]


def _dicom_elements(data: bytes) -> list[int]:
    """Offsets of the element headers of an implicit-VR little-endian data set after the file meta group."""
    pos, out = 132, []
    while pos + 8 <= len(data) and struct.unpack_from("<H", data, pos)[0] == 0x0002:
        length = struct.unpack_from("<H", data, pos + 6)[0] if data[pos + 4:pos + 6] not in (b"OB", b"UN") \
            else struct.unpack_from("<I", data, pos + 8)[0] + 4
        pos += 8 + length
    while pos + 8 <= len(data):
        out.append(pos)
        group, length = struct.unpack_from("<H", data, pos)[0], struct.unpack_from("<I", data, pos + 4)[0]
        # Into undefined-length sequences and into items: their content is elements too.
        pos += 8 if length == 0xFFFFFFFF or group == 0xFFFE else 8 + length
    return out


def _nifti_raw(data: bytes, gz: bool) -> bytearray:
    try:
        return bytearray(gzip.decompress(data) if gz else data)
    except (OSError, EOFError, zlib.error):  # already damaged by an earlier operation
        return bytearray()


def apply(op: tuple, data: bytes, variant: str) -> bytes:
    """One corruption ``op`` applied to the bytes of one file of ``variant``."""
    kind = op[0]
    b = bytearray(data)
    if kind == "truncate":
        return bytes(b[:int(op[1] * len(b))])
    if kind == "flip" and b:
        b[int(op[1] * len(b)) % len(b)] ^= 1 << op[2]
    elif kind == "header_byte" and b:
        b[op[1] % min(len(b), 1024)] = op[2]
    elif kind == "splice" and b:
        at = int(op[1] * len(b))
        b[at:at + len(op[2])] = op[2]
    elif kind == "garbage":
        return bytes(op[1])
    elif kind == "field":
        if variant.startswith(("nrrd", "mha")):
            return _set_text_field(data, op[1], TEXT_VALUES[op[2] % len(TEXT_VALUES)])
        if variant.startswith("nii"):
            raw = _nifti_raw(data, variant == "nii.gz")
            offset, fmt = NIFTI_FIELDS[op[1] % len(NIFTI_FIELDS)]
            if len(raw) >= 348:
                values = NIFTI_VALUES[fmt]
                struct.pack_into("<" + fmt, raw, offset, values[op[2] % len(values)])
                return gzip.compress(bytes(raw)) if variant == "nii.gz" else bytes(raw)
            return data
        elements = _dicom_elements(data)
        if elements:
            pos = elements[op[1] % len(elements)]
            struct.pack_into("<I", b, pos + 4, DICOM_LENGTHS[op[2] % len(DICOM_LENGTHS)])
    elif kind == "huge":
        sizes = HUGE_SIZES[op[1] % len(HUGE_SIZES)]
        if variant.startswith(("nrrd", "mha")):
            return _set_text_sizes(data, sizes)
        if variant.startswith("nii"):
            raw = _nifti_raw(data, variant == "nii.gz")
            if len(raw) >= 348:
                struct.pack_into("<4h", raw, 40, 3, *(min(s, 32767) for s in sizes))
                return gzip.compress(bytes(raw)) if variant == "nii.gz" else bytes(raw)
            return data
        for tag, value in ((b"\x28\x00\x10\x00", sizes[0]), (b"\x28\x00\x11\x00", sizes[1])):  # Rows, Columns
            at = b.find(tag + b"\x02\x00\x00\x00")
            if at >= 0:
                struct.pack_into("<H", b, at + 8, min(value, 65535))
    return bytes(b)


def write_case(folder: Path, variant: str, seed_files: dict[str, bytes], ops: list[tuple], target: int) -> Path:
    """Write the seed files of ``variant`` into ``folder`` with file ``target`` corrupted; return the input path."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(seed_files)
    victim = names[target % len(names)]
    for name in names:
        data = seed_files[name]
        if name == victim:
            for op in ops:
                data = apply(op, data, variant)
        (folder / name).write_bytes(data)
    return folder if variant == "dicom-series" else folder / victim


# Hypothesis: one to three operations per case.
fraction = st.floats(0, 1, exclude_max=True, allow_nan=False)
OPERATION = st.one_of(
    st.tuples(st.just("truncate"), fraction),
    st.tuples(st.just("flip"), fraction, st.integers(0, 7)),
    st.tuples(st.just("header_byte"), st.integers(0, 1023), st.integers(0, 255)),
    st.tuples(st.just("splice"), fraction, st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("field"), st.integers(0, 10**6), st.integers(0, 10**6)),
    st.tuples(st.just("field"), st.integers(0, 10**6), st.integers(0, 10**6)),  # twice as likely
    st.tuples(st.just("huge"), st.integers(0, 10**6)),
    st.tuples(st.just("garbage"), st.binary(max_size=512)),
)
OPERATIONS = st.lists(OPERATION, min_size=1, max_size=3)


def random_ops(rng: random.Random) -> list[tuple]:
    """The same kinds of operations as ``OPERATIONS``, drawn with ``random`` (for the subprocess sample)."""
    def one() -> tuple:
        kind = rng.choice(["truncate", "flip", "header_byte", "splice", "field", "field", "huge", "garbage"])
        if kind == "truncate":
            return kind, rng.random()
        if kind == "flip":
            return kind, rng.random(), rng.randrange(8)
        if kind == "header_byte":
            return kind, rng.randrange(1024), rng.randrange(256)
        if kind == "splice":
            return kind, rng.random(), rng.randbytes(rng.randint(1, 32))
        if kind == "field":
            return kind, rng.randrange(10**6), rng.randrange(10**6)
        if kind == "huge":
            return kind, rng.randrange(10**6)
        return kind, rng.randbytes(rng.randrange(512))
    return [one() for _ in range(rng.randint(1, 3))]


def read_outcome(path: Path, kind: str) -> str:
    """Read ``path``; return "refused" or "read", failing on anything else."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        array, geometry = read_image(path)
    except UserError as exc:
        message = str(exc)
        assert message.startswith(str(path)), message  # names the file (or a file in the folder)
        assert "\n" not in message, message
        TALLY[(kind, "refused")] += 1
        return "refused"
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert array.ndim == 3 and array.shape == geometry.size, (array.shape, geometry)
    TALLY[(kind, "read")] += 1
    return "read"


# ---------------------------------------------------------------------------------------------
# A crash guard first: a sample through `unetpp3d check` in a subprocess
# ---------------------------------------------------------------------------------------------

SUBPROCESS_CRASHED: list[str] = []


def _check_sample(seeds: dict, folder: Path, per_variant: int, seed: int) -> tuple[int, str]:
    rng = random.Random(seed)
    test_entries = []
    for variant in VARIANTS:
        for i in range(per_variant):
            path = write_case(folder / f"{variant}_{i}", variant, seeds[variant], random_ops(rng), rng.randrange(4))
            test_entries.append({"image": str(path), "name": f"{variant}_{i}"})
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "training": [],
                                    "test": test_entries}))
    proc = subprocess.run([sys.executable, "-m", "unetpp3d", "check", "--manifest", str(manifest),
                           "--fingerprint", str(folder / "fingerprint.json")],
                          capture_output=True, encoding="utf-8", errors="replace", env=ONE_THREAD,
                          timeout=600)
    output = proc.stdout + proc.stderr
    # 0: every file read; 2: some refused, the user's to fix. 1 would be a crash (an uncaught exception).
    if proc.returncode < 0 or proc.returncode not in (0, 2) or "Traceback" in output:
        SUBPROCESS_CRASHED.append(f"exit status {proc.returncode}")
    assert proc.returncode in (0, 2), f"`unetpp3d check` ended with status {proc.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    refused = len({line.split(":")[1] for line in errors})
    TALLY[("subprocess check", "refused")] += refused
    TALLY[("subprocess check", "read")] += len(test_entries) - refused
    return len(test_entries), proc.stdout


def test_a_sample_of_corrupted_files_does_not_crash_unetpp3d_check(seeds, tmp_path):
    n, out = _check_sample(seeds, tmp_path, per_variant=4, seed=1)
    assert f"{n} case(s)" in out


@pytest.mark.slow
def test_a_large_sample_of_corrupted_files_does_not_crash_unetpp3d_check(seeds, tmp_path):
    _check_sample(seeds, tmp_path, per_variant=25, seed=FUZZ_SEED)


@pytest.fixture
def no_crash_seen():
    if SUBPROCESS_CRASHED:
        pytest.skip(f"`unetpp3d check` crashed on a corrupted file ({SUBPROCESS_CRASHED[0]}); reading in-process "
                    "could kill pytest")


# ---------------------------------------------------------------------------------------------
# In-process fuzz of the reader
# ---------------------------------------------------------------------------------------------


def _fuzz_reader(seeds, folder: Path, variant: str, ops: list[tuple], target: int, counter: list[int]) -> None:
    counter[0] += 1
    case = folder / f"{variant}_{counter[0]}"
    read_outcome(write_case(case, variant, seeds[variant], ops, target), variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_corrupted_images_are_refused_or_read_correctly(seeds, tmp_path, no_crash_seen, variant):
    counter = [0]

    @settings(max_examples=QUICK_IMAGES, **QUICK)
    @given(ops=OPERATIONS, target=st.integers(0, 3))
    def run(ops, target):
        _fuzz_reader(seeds, tmp_path, variant, ops, target, counter)

    run()


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_corrupted_images_long_run(seeds, tmp_path, no_crash_seen, variant):
    counter = [0]

    @seed(FUZZ_SEED)
    @settings(max_examples=SLOW_IMAGES, **SETTINGS)
    @given(ops=OPERATIONS, target=st.integers(0, 3))
    def run(ops, target):
        _fuzz_reader(seeds, tmp_path, variant, ops, target, counter)

    run()


@pytest.mark.parametrize("variant", ["nii", "nii.gz", "mha", "mha-zlib", "nrrd", "nrrd-gzip"])
def test_truncated_by_one_byte_is_refused(seeds, tmp_path, variant):
    """The smallest truncation: ITK zero-fills what is missing of some formats, so the reader must check."""
    (name, data), = seeds[variant].items()
    path = tmp_path / name
    path.write_bytes(data[:-1])
    # For nrrd-gzip only the gzip trailer (CRC, length) loses a byte: every voxel is still there,
    # but a stream that stops before its end is refused like a truncated .nii.gz, whose check
    # is that trailer; a write cut short on a full disk looks exactly like this.
    with pytest.raises(UserError, match="truncated|corrupt"):
        read_image(path)


@pytest.mark.parametrize("variant", ["mha-zlib", "nrrd-gzip", "mha", "nrrd"])
def test_declared_size_larger_than_the_data_is_refused(seeds, tmp_path, variant):
    """A valid (compressed) stream with fewer voxels than the header says: ITK would zero-fill the rest."""
    (name, data), = seeds[variant].items()
    path = tmp_path / name
    path.write_bytes(_set_text_sizes(data, (8, 9, 11)))
    with pytest.raises(UserError, match=r"truncated.*1,584 bytes"):
        read_image(path)


@pytest.mark.parametrize("ndims", ["0", "-1", "11", "100", "2048", "x"])
def test_metaimage_dimension_count_that_would_crash_itk_is_refused(seeds, tmp_path, ndims):
    """NDims outside 1..10 makes ITK's MetaImage reader write past its arrays (a segfault): refused first."""
    (name, data), = seeds["mha"].items()
    path = tmp_path / name
    path.write_bytes(data.replace(b"NDims = 3", f"NDims = {ndims}".encode(), 1))
    with pytest.raises(UserError, match="NDims"):
        read_image(path)


@pytest.mark.parametrize("value", [b"L\x7fv\x8b\xf0\\ \xbd\xd5\xbf\xbd", b"slice%s%s%s%s%n.raw 1 3 1", b"LIST"])
def test_metaimage_data_file_list_or_pattern_is_refused_in_a_subprocess(seeds, tmp_path, value):
    """A damaged ElementDataFile that MetaIO takes for a multi-file pattern (it holds a "%")
    corrupted the heap: the long fuzz run produced such values, and the process aborted reads
    later. Refused before ITK sees it, as are control characters (the first value, the start of
    one of those) and LIST; read in a subprocess, so that a regression fails this test, not the
    suite."""
    (name, data), = seeds["mha"].items()
    path = tmp_path / name
    path.write_bytes(data.replace(b"ElementDataFile = LOCAL", b"ElementDataFile = " + value, 1))
    code = ("import sys\nfrom unetpp3d.imageio.readers import read_image\nfrom unetpp3d.errors import UserError\n"
            "for _ in range(20):\n    try:\n        read_image(sys.argv[1])\n    except UserError as exc:\n"
            "        message = str(exc)\nprint(message)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, encoding="utf-8",
                          errors="replace", timeout=HANG_S,
                          env={**ONE_THREAD, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ElementDataFile" in proc.stdout and "neither LOCAL nor one file name" in proc.stdout


@pytest.mark.parametrize("raw_name", ["volume.raw", "scan 1.raw", "Ωmega çt.raw"])
def test_metaimage_with_its_voxels_in_one_other_file_is_read(seeds, tmp_path, raw_name):
    """The refusal above leaves the ordinary header + raw pair (.mhd/.raw) alone, spaces and
    non-ASCII letters in the name included."""
    (name, data), = seeds["mha"].items()
    start = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    (tmp_path / raw_name).write_bytes(data[start:])
    (tmp_path / "volume.mhd").write_bytes(data[:start].replace(b"= LOCAL", b"= " + raw_name.encode()))
    np.testing.assert_array_equal(read_image(tmp_path / "volume.mhd")[0], VOLUME)


def test_dicom_element_longer_than_its_file_is_refused_before_gdcm_allocates_it(seeds, tmp_path):
    """A 1 kB slice whose pixel-data length says 2 GB: GDCM would allocate it; refused from the lengths."""
    data = bytearray(seeds["dicom-series"]["s2.dcm"])
    pixel_data = _dicom_elements(bytes(data))[-1]
    assert data[pixel_data:pixel_data + 4] == b"\xe0\x7f\x10\x00"
    struct.pack_into("<I", data, pixel_data + 4, 0x80000002)
    series = tmp_path / "series"
    series.mkdir()
    for name, content in seeds["dicom-series"].items():
        (series / name).write_bytes(bytes(data) if name == "s2.dcm" else content)
    with pytest.raises(UserError, match=r"s2\.dcm: damaged DICOM file: element \(7FE0,0010\).*2,147,483,650 bytes"):
        read_image(series)
    # a truncated slice is refused too, instead of being skipped as "not DICOM"
    (series / "s2.dcm").write_bytes(seeds["dicom-series"]["s2.dcm"][:-10])
    with pytest.raises(UserError, match=r"s2\.dcm: damaged DICOM file"):
        read_image(series)


# ---------------------------------------------------------------------------------------------
# Detached headers: read only the one data file beside the header, whatever the header says
# ---------------------------------------------------------------------------------------------

SECRET = b"\xab" * 4096  # bytes outside the header's folder: a read must never return them
DETACHED_VOXELS = bytes(range(24))
DATA_TARGETS = ["beside", "beside-short", "beside-long", "subfolder", "parent", "absolute-outside",
                "symlink-outside", "symlink-beside", "fifo", "device", "missing", "folder", "LIST", "pattern",
                "dotdot-back-inside", "self"]
NAME_TEXT = st.sampled_from(["data.raw", "scan 1.raw", "Ωmega çt.raw", "d.img", "x.nii.gz", "-", "a:b.raw"])


def _detached_case(folder: Path, fmt: str, target: str, name: str, key: str) -> Path:
    """A header (``fmt`` "mhd" or "nhdr") naming a data file that is ``target``; returns the header."""
    outside = folder / "outside"
    header_dir = folder / "header dir"
    outside.mkdir(parents=True)
    header_dir.mkdir()
    (outside / "secret.bin").write_bytes(SECRET)
    data = {"beside-short": DETACHED_VOXELS[:7], "beside-long": DETACHED_VOXELS + b"\0" * 9}.get(target,
                                                                                               DETACHED_VOXELS)
    header = header_dir / ("scan.mhd" if fmt == "mhd" else "scan.nhdr")
    field = {"subfolder": f"sub/{name}", "parent": "../outside/secret.bin",
             "absolute-outside": str(outside / "secret.bin"), "LIST": "LIST", "pattern": "slice%03d.raw 1 3 1",
             "dotdot-back-inside": f"../header dir/{name}", "self": header.name}.get(target, name)
    if target in ("beside", "beside-short", "beside-long", "dotdot-back-inside"):
        (header_dir / name).write_bytes(data)
    elif target == "subfolder":
        (header_dir / "sub").mkdir()
        (header_dir / "sub" / name).write_bytes(data)
    elif target == "symlink-outside":
        (header_dir / name).symlink_to(outside / "secret.bin")
    elif target == "symlink-beside":
        (header_dir / "real.raw").write_bytes(data)
        (header_dir / name).symlink_to(header_dir / "real.raw")
    elif target == "fifo":
        os.mkfifo(header_dir / name)
    elif target == "device":
        (header_dir / name).symlink_to("/dev/zero")
    elif target == "folder":
        (header_dir / name).mkdir()
    if fmt == "mhd":
        text = (f"ObjectType = Image\nNDims = 3\nDimSize = 2 3 4\nElementType = MET_UCHAR\nElementSpacing = 1 1 1\n"
                f"{key} {field}\n")
    else:
        text = f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 2 3 4\nspacings: 1 1 1\nencoding: raw\n{key} {field}\n"
    header.write_bytes(text.encode("utf-8"))
    return header


def _fuzz_detached(folder: Path, fmt: str, target: str, name: str, key: str, counter: list[int]) -> None:
    counter[0] += 1
    header = _detached_case(folder / f"case {counter[0]}", fmt, target, name, key)
    if read_outcome(header, f"detached {fmt}") == "read":
        array = read_image(header)[0]
        raw = array.transpose(2, 1, 0).tobytes()
        assert b"\xab" not in raw, f"{header}: read bytes from outside its folder ({target})"
        assert raw == DETACHED_VOXELS, (target, raw)
        assert target in ("beside", "beside-long", "subfolder", "symlink-beside", "dotdot-back-inside"), target
    elif name != "-" and not (fmt == "nhdr" and ":" in name):
        # "-" is standard input (refused, never read); teem cannot open a name with a colon
        assert target not in ("beside", "symlink-beside"), f"{header}: a valid detached pair was refused"


MHD_KEYS = st.sampled_from(["ElementDataFile =", "ElementDataFile:", "ElementDataFile  =  ", "ElementDataFile="])
NHDR_KEYS = st.sampled_from(["data file:", "datafile:", "DATA FILE:", "Data File:"])


@pytest.mark.parametrize("fmt", ["mhd", "nhdr"])
def test_detached_headers_read_only_the_data_file_beside_them(tmp_path, fmt):
    counter, seen = [0], set()

    @settings(max_examples=QUICK_IMAGES * 2, **QUICK)
    @given(target=st.sampled_from(DATA_TARGETS), name=NAME_TEXT, key=MHD_KEYS if fmt == "mhd" else NHDR_KEYS)
    def run(target, name, key):
        seen.add(target)
        _fuzz_detached(tmp_path, fmt, target, name, key, counter)

    run()
    assert seen == set(DATA_TARGETS)  # the quick run (always the same) tries every kind of target


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["mhd", "nhdr"])
def test_detached_headers_long_run(tmp_path, fmt):
    counter = [0]

    @seed(FUZZ_SEED)
    @settings(max_examples=SLOW_IMAGES, **SETTINGS)
    @given(target=st.sampled_from(DATA_TARGETS), name=NAME_TEXT, key=MHD_KEYS if fmt == "mhd" else NHDR_KEYS)
    def run(target, name, key):
        _fuzz_detached(tmp_path, fmt, target, name, key, counter)

    run()


# ---------------------------------------------------------------------------------------------
# Output names: any chain of suffixes before the format's own is written whole, under that name
# ---------------------------------------------------------------------------------------------

NAME_PARTS = st.sampled_from(["img", "hdr", "nii", "gz", "part", "nrrd", "mha", "mhd", "tar", "x", "Ωm", "a b", "",
                              "IMG", "NII"])
MASK_VOLUME = (np.arange(4 * 5 * 6).reshape(4, 5, 6) % 3).astype(np.uint8)


def _fuzz_output_name(folder: Path, parts: list[str], suffix: str, counter: list[int]) -> None:
    from unetpp3d.geometry import Geometry
    from unetpp3d.imageio.writer import write_mask

    counter[0] += 1
    out = folder / f"{counter[0]}"
    out.mkdir()
    name = ".".join(["m", *parts]) + suffix
    grid = Geometry((4, 5, 6), (0.5, 0.6, 2.0), (1.0, 2.0, 3.0), (1, 0, 0, 0, -1, 0, 0, 0, 1))
    write_mask(MASK_VOLUME, grid, out / name)
    assert [p.name for p in out.iterdir()] == [name]
    array, geometry = read_image(out / name, is_label=True)
    np.testing.assert_array_equal(array, MASK_VOLUME)
    assert geometry.same_grid(grid)
    TALLY[("output name", "written")] += 1


def test_output_names_with_any_suffixes_are_written_whole(tmp_path):
    counter = [0]

    @settings(max_examples=QUICK_IMAGES * 2, **QUICK)
    @given(parts=st.lists(NAME_PARTS, max_size=4), suffix=st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha"]))
    def run(parts, suffix):
        _fuzz_output_name(tmp_path, parts, suffix, counter)

    run()


@pytest.mark.slow
def test_output_names_long_run(tmp_path):
    counter = [0]

    @seed(FUZZ_SEED)
    @settings(max_examples=SLOW_IMAGES, **SETTINGS)
    @given(parts=st.lists(NAME_PARTS, max_size=6), suffix=st.sampled_from([".nii.gz", ".nii", ".nrrd", ".mha"]))
    def run(parts, suffix):
        _fuzz_output_name(tmp_path, parts, suffix, counter)

    run()


# ---------------------------------------------------------------------------------------------
# Non-regular files wherever a file is read
# ---------------------------------------------------------------------------------------------

NON_REGULAR = ["fifo", "/dev/zero", "/dev/null", "folder", "dangling link"]
READERS = {
    "image": lambda p: read_image(p),
    "label": lambda p: read_image(p, is_label=True),
    "manifest": lambda p: load_manifest(p),
    "config": lambda p: __import__("unetpp3d.config", fromlist=["load_config"]).load_config(p),
    "checkpoint": lambda p: __import__("unetpp3d.model.checkpoint", fromlist=["load_checkpoint"]).load_checkpoint(p),
}


def _fuzz_non_regular(folder: Path, kind: str, role: str, suffix: str, counter: list[int]) -> None:
    counter[0] += 1
    path = folder / f"{counter[0]}{suffix}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "dangling link":
        path.symlink_to(folder / "nowhere")
    else:
        path.symlink_to(kind)
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        with pytest.raises(UserError) as info:
            READERS[role](path)
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    TALLY[("non-regular file", "refused")] += 1


def test_non_regular_files_are_refused_wherever_a_file_is_read(tmp_path):
    counter = [0]

    @settings(max_examples=QUICK_IMAGES * 2, **QUICK)
    @given(kind=st.sampled_from(NON_REGULAR), role=st.sampled_from(sorted(READERS)),
           suffix=st.sampled_from([".nii.gz", ".nrrd", ".mha", ".json", ".yaml", ".pt", ".dcm", ""]))
    def run(kind, role, suffix):
        _fuzz_non_regular(tmp_path, kind, role, suffix, counter)

    run()


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------

MANIFEST_KEYS = ["labels", "training", "validation", "test", "task", "modality", "channel_names", "file_ending",
                 "image", "label", "name", "numTraining"]
PATH_TEXT = st.sampled_from(["a.nii.gz", "imagesTr/a.nii.gz", "../x.nii.gz", "", " ", "/", ".", "dicom/",
                             "Ünïcode scan 1.nii.gz", "a\x00b.nii.gz", "C:\\scan.nii", "x" * 300])
leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**70), st.floats(allow_nan=True),
                 st.text(max_size=8), PATH_TEXT)
json_value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(MANIFEST_KEYS) | st.text(max_size=5), inner, max_size=4),
                          max_leaves=16)
label_map = st.one_of(
    st.dictionaries(st.sampled_from(["0", "1", "2", "-1", "01", " 1", "x", "1.0"]),
                    st.sampled_from(["background", "liver", "nodule", ""]) | leaf, max_size=4),
    st.dictionaries(st.sampled_from(["background", "liver", "nodule"]), st.integers(-1, 3) | leaf, max_size=4),
    json_value,
)
case_entry = st.one_of(
    st.fixed_dictionaries({"image": PATH_TEXT | leaf}, optional={"label": PATH_TEXT | leaf, "name": leaf | PATH_TEXT}),
    PATH_TEXT, json_value,
)
VALID_LABELS = st.sampled_from([{"0": "background", "1": "liver"}, {"background": 0, "liver": 1},
                                 {"0": "background", "1": "liver", "2": "tumour"}, {"0": "background"}])
valid_entry = st.builds(lambda i, named: {"image": f"imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz",
                                          **({"name": f"case {i}"} if named else {})},
                        st.integers(0, 5), st.booleans())
# Mostly well-formed: the checks past the first missing key get exercised too.
near_valid_manifest = st.fixed_dictionaries(
    {"labels": VALID_LABELS, "training": st.lists(valid_entry, min_size=1, max_size=6)},
    optional={"validation": st.none() | st.lists(valid_entry, max_size=2),
              "test": st.lists(st.sampled_from(["imagesTs/t1.nii.gz", "scan 2.nrrd", "dicom/"]) | PATH_TEXT,
                               max_size=2),
              "task": st.sampled_from(["liver", "lung_nodule", "liver", "brain"]),
              "modality": st.sampled_from([{"0": "CT"}, {"0": "CT", "1": "MR"}, "CT", None])},
)
manifest_object = near_valid_manifest | st.fixed_dictionaries({}, optional={
    "labels": label_map,
    "training": st.lists(case_entry, max_size=5) | json_value,
    "validation": st.lists(case_entry, max_size=3) | json_value,
    "test": st.lists(case_entry, max_size=3) | json_value,
    "task": st.sampled_from(["liver", "lung_nodule", "brain", "", None, 3]),
    "modality": json_value, "channel_names": json_value,
    "file_ending": st.sampled_from([".nii.gz", ".mha", "", 5, None]),
})
manifest_text = st.one_of(
    near_valid_manifest.map(lambda m: json.dumps(m).encode()),
    near_valid_manifest.map(lambda m: json.dumps(m).encode()),
    manifest_object.map(lambda m: json.dumps(m, allow_nan=True).encode()),
    manifest_object.map(lambda m: json.dumps(m).encode()).flatmap(
        lambda b: st.integers(0, max(len(b) - 1, 0)).map(lambda n: b[:n])),  # truncated JSON
    json_value.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.sampled_from([b"\xef\xbb\xbf{}", b"\xff\xfe{\x00}\x00", b"NaN", b"[]", b"null", b"{\"labels\": Infinity}"]),
)


def _fuzz_manifest(folder: Path, text: bytes, fold: int | None, counter: list[int]) -> None:
    counter[0] += 1
    path = folder / f"m{counter[0]}.json"
    path.write_bytes(text)
    (folder / "imagesTr").mkdir(exist_ok=True)
    try:
        manifest = load_manifest(path)
        split_cases(manifest, fold=fold, folds=2)
    except UserError as exc:
        assert str(exc).strip()
        TALLY[("manifest", "refused")] += 1
        return
    TALLY[("manifest", "loaded")] += 1


def test_fuzzed_manifests_load_or_raise_user_errors(tmp_path):
    counter = [0]

    @settings(max_examples=QUICK_MANIFESTS, **QUICK)
    @given(text=manifest_text, fold=st.none() | st.integers(-1, 2))
    def run(text, fold):
        _fuzz_manifest(tmp_path, text, fold, counter)

    run()


@pytest.mark.slow
def test_fuzzed_manifests_long_run(tmp_path):
    counter = [0]

    @seed(FUZZ_SEED)
    @settings(max_examples=SLOW_MANIFESTS, **SETTINGS)
    @given(text=manifest_text, fold=st.none() | st.integers(-1, 2))
    def run(text, fold):
        _fuzz_manifest(tmp_path, text, fold, counter)

    run()


def test_deeply_nested_json_manifest_is_a_user_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError):
        load_manifest(path)
