"""The figure generators run: ``derivations/figures.py`` and ``bench/plot.py``.

Both scripts are run into a temporary folder, so that a change in the
reference functions or in the results' format that breaks them fails here.
Every PNG must decode, stay under 150 KB (a figure for a Markdown page, not
a photograph) and carry no time stamp; the committed figures must be the ones
the derivations and the README embed.  The synthetic results files below
follow the three formats ``bench/plot.py`` reads, with the gaps real runs
have (a skipped path, a failed configuration, a missing library).
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
import zlib

import matplotlib.image
import pytest

from tests.conftest import REPO

LIMIT = 150 * 1024


def _load(relpath, name):
    spec = importlib.util.spec_from_file_location(name, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def figures():
    return _load("derivations/figures.py", "derivation_figures")


@pytest.fixture(scope="module")
def plot():
    return _load("bench/plot.py", "bench_plot")


def png_chunks(data):
    """The chunk types of a PNG, after checking its signature and every chunk's CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    types, i = [], 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind, body = data[i + 4 : i + 8], data[i + 8 : i + 8 + length]
        (crc,) = struct.unpack(">I", data[i + 8 + length : i + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        types.append(kind)
        i += 12 + length
    assert types[0] == b"IHDR" and types[-1] == b"IEND", types
    return types


def check_png(path):
    data = path.read_bytes()
    assert len(data) < LIMIT, f"{path.name}: {len(data) / 1024:.0f} KB, over the 150 KB limit"
    types = png_chunks(data)
    assert b"tIME" not in types and b"Software" not in data, f"{path.name}: time stamp or version in the metadata"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 300, (path.name, image.shape)
    assert image.std() > 0.05, f"{path.name}: an empty picture"


def test_png_checker_rejects_what_it_should(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"GIF89a" + bytes(100))
    with pytest.raises(AssertionError, match="signature"):
        check_png(bad)
    good = tmp_path / "good.png"
    matplotlib.image.imsave(good, [[0.0, 1.0] * 200] * 250)
    data = bytearray(good.read_bytes())
    data[40] ^= 0xFF  # inside the first chunks: the CRC no longer matches
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(AssertionError, match="CRC"):
        check_png(corrupt)
    big = tmp_path / "big.png"
    big.write_bytes(good.read_bytes() + bytes(LIMIT))
    with pytest.raises(AssertionError, match="150 KB"):
        check_png(big)


# ----------------------------------------------------------------------------- derivations
def test_derivation_figures_are_drawn(figures, tmp_path):
    written = figures.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in written) == sorted(f"{name}.png" for name in figures.FIGURES)
    for path in written:
        check_png(path)


def test_derivation_figures_are_deterministic(figures, tmp_path):
    first = figures.main(["--out", str(tmp_path / "a"), "--only", "T_invariance"])[0]
    second = figures.main(["--out", str(tmp_path / "b"), "--only", "T_invariance"])[0]
    assert first.read_bytes() == second.read_bytes()


def test_derivation_figures_are_committed_and_embedded(figures):
    for name, (derivation, _) in figures.FIGURES.items():
        check_png(REPO / "derivations" / f"{name}.png")
        text = (REPO / "derivations" / derivation).read_text(encoding="utf-8")
        embed = re.search(rf"^!\[[^\]]+\]\({re.escape(name)}\.png\)\n\n\*Figure \(([^)]*)\)\.\*", text, re.M)
        assert embed, f"{derivation} does not embed {name}.png with a caption"
        for eq_id in re.findall(r"[A-Z]\d", embed.group(1)):
            assert re.search(rf"^## {eq_id}\b", text, re.M), f"{name}: caption names {eq_id}, not in {derivation}"


# ----------------------------------------------------------------------------- benchmark plots
MACHINE = {"cpu": "Test CPU 9000", "cores": 4, "memory_gb": 8.0, "numpy": "2.0", "numba": "0.60", "torch": "2.5"}


def cpu_results():
    def res(t):
        return {"median_s": t, "times_s": [t]}

    cases = []
    for kind, sizes in (("forward", [(256, 256), (1024, 1024)]), ("decode", [(1, 65536), (16, 65536)])):
        for n, m in sizes:
            for dtype in ("float64", "float32"):
                scale = n * m * 1e-9
                results = {"reference": res(40 * scale), "cpu": res(scale), "torch": res(1.2 * scale), "roof": res(0.8 * scale)}
                if n == 1024:
                    results["reference"] = {"skipped": "needs about 9 GB (> --max-ref-gb 8.0)"}
                if kind == "decode" and dtype == "float32":
                    del results["torch"]  # a peer that was not installed
                if n == 16 and dtype == "float64":
                    results["cpu"] = {"error": "RuntimeError: out of memory"}
                cases.append({"kind": kind, "N": n, "M": m, "D": 64, "dtype": dtype, "results": results})
    return {"machine": MACHINE, "command": "bench_cpu.py", "cases": cases, "notes": []}


def gpu_results():
    configs = []
    for n in (1024, 4096):
        for dtype in ("float32", "float64"):
            t = n * n * 1e-10
            cfg = {"n": n, "m": n, "d": 64, "dv": 64, "dtype": dtype,
                   "ours_fwd_s": t, "ours_bwd_s": 3 * t, "torch_fwd_s": t / 5, "torch_bwd_s": t / 2,
                   "roof_fwd_s": t / 8, "roof_bwd_s": t / 4}
            if n == 4096 and dtype == "float64":
                for key in ("torch_fwd_s", "torch_bwd_s", "roof_fwd_s", "roof_bwd_s"):
                    del cfg[key]
                cfg["error"] = "RuntimeError: out of memory"
            configs.append(cfg)
    return {"machine": {"gpu": "Test GPU", "gpu_memory_gib": 80.0, "backend": "gpu", "torch": "2.5"},
            "args": {}, "configs": configs, "skipped": []}


def accuracy_results():
    cases = []
    for i, (name, dtype) in enumerate([("easy", "float64"), ("hard", "float64"), ("easy, float32", "float32")]):
        results = {lib: {"dtype_out": dtype, "L_ulp": 0.3 * (i + 1) * k, "r_max_ulp": 0.0 if i == 0 else 2.0 * k,
                         "sum_minus_1_in_u": 0.1} for k, lib in enumerate(["iem_ref", "scipy", "torch"], start=1)}
        if i == 1:
            results["torch"]["L_ulp"] = float("nan")
            del results["scipy"]
        cases.append({"case": name, "n": 10, "dtype": dtype, "kappa": 1.0 + i, "results": results})
    return {"meta": {"date": "2026-01-01T00:00:00+00:00", "machine": "Linux-test", "libraries": {"iem_ref": "0.1.0"}}, "cases": cases}


@pytest.mark.parametrize(
    "maker, kind, expected",
    [
        (cpu_results, "cpu", ["results_time.png", "results_vs_torch.png"]),
        (gpu_results, "gpu", ["results_time.png", "results_vs_torch.png"]),
        (accuracy_results, "accuracy", ["results_ulps.png"]),
    ],
)
def test_plot_each_format(plot, tmp_path, maker, kind, expected):
    data = maker()
    assert plot.kind_of(data) == kind
    src = tmp_path / "results.json"
    src.write_text(json.dumps(data))
    written = plot.plot_file(src, tmp_path / "out")
    assert sorted(p.name for p in written) == expected
    for path in written:
        check_png(path)


def test_plot_gaps_are_gaps_not_points(plot):
    panels, notes = plot.cpu_series(cpu_results())
    forward64 = panels[("forward", "float64")]
    assert [n for n, _ in forward64[("reference", 64, None)]] == [256]  # skipped at 1024
    assert ("torch", 64, 65536) not in panels[("decode", "float32")]
    assert [n for n, _ in panels[("decode", "float64")][("cpu", 64, 65536)]] == [1]  # failed at 16
    assert notes.count("reference skipped") == 2 and notes.count("cpu failed") == 1
    ratios = {(label, dtype): r for label, dtype, r in plot.cpu_ratio_rows(cpu_results())}
    assert ratios[("forward N=M=256 D=64", "float64")] == pytest.approx(1.2)
    assert ratios[("decode N=1 M=64Ki D=64", "float32")] is None
    gpu_panels, gpu_notes = plot.gpu_series(gpu_results())
    assert [n for n, _ in gpu_panels[("forward", "float64")][("torch", 64, None)]] == [1024]
    assert "torch failed" in gpu_notes


def test_plot_names_the_machine(plot):
    assert plot.cpu_machine(cpu_results()) == "Test CPU 9000, 4 cores, 8.0 GiB; numpy 2.0, numba 0.60, torch 2.5"
    assert plot.cpu_machine({"cases": []}) == "machine not recorded"
    assert plot.gpu_machine(gpu_results()).startswith("Test GPU, 80.0 GiB")
    simulated = dict(gpu_results(), note="simulator: the timings mean nothing")
    simulated["machine"] = {"backend": "simulator"}
    assert "simulator" in plot.gpu_machine(simulated)
    assert plot.accuracy_machine(accuracy_results()).startswith("Linux-test; 2026-01-01")


def test_plot_refuses_what_it_cannot_read(plot, tmp_path, capsys):
    with pytest.raises(plot.UnknownResults):
        plot.kind_of({"rows": []})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"rows": [{"op": "forward"}]}))
    assert plot.main([str(other), str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "missing.json: no such file" in err and "other.json: not CPU timings" in err
    nothing = cpu_results()
    for case in nothing["cases"]:
        case["results"] = {path: {"skipped": "not run"} for path in case["results"]}
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps(nothing))
    assert plot.plot_file(empty, tmp_path / "none") == []
    assert not list((tmp_path / "none").glob("*.png"))


def test_plot_the_committed_results(plot, tmp_path):
    """The results files in bench/results still parse, and the committed plots are the ones linked."""
    assert plot.main(["--out", str(tmp_path)]) == 0
    expected = {"cpu_time.png", "cpu_vs_torch.png", "gpu_time.png", "gpu_vs_torch.png", "accuracy_ulps.png"}
    assert {p.name for p in tmp_path.glob("*.png")} == expected
    for name in sorted(expected):
        check_png(tmp_path / name)
        check_png(REPO / "bench" / "results" / name)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "](bench/results/cpu_time.png)" in readme
    for results_md, names in (("cpu.md", ["cpu_time.png", "cpu_vs_torch.png"]), ("gpu.md", ["gpu_time.png", "gpu_vs_torch.png"]),
                              ("accuracy.md", ["accuracy_ulps.png"])):
        text = (REPO / "bench" / "results" / results_md).read_text(encoding="utf-8")
        for name in names:
            assert f"]({name})" in text, f"{results_md} does not link {name}"
