"""The command line ``python -m blockops demo | bench | check`` at small sizes.

Each subcommand runs in-process through ``main([...])`` (and ``check`` once
through ``subprocess``), writes its JSON and figures where asked, and bad
arguments give a usage message and exit code 2 (the subcommand's usage for
the subcommand's arguments). An output path that cannot be written or a size
that cannot fit in half of the memory is refused in one line, exit code 2,
before any work. The pieces of the CLI that
compute something of their own (the data task, the optimisers, the slope fit,
the plain-NumPy reference of ``check``) are checked against independent
references: the oscillator ODE, closed-form quadratic minimisers, finite
differences, dense eigenvalue counts (the inertia that controls the shift of
the inertia-controlled Newton method, the positive definiteness of every
preconditioner MINRES and CG are given). Figures are checked for one axes
per panel drawn and for legends that cover no axes.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

import blockops
from blockops.__main__ import main
from blockops.backend import cupy_available
from blockops.cli import optimizers
from blockops.cli.check import reference_ggn, reference_hessian, reference_loss_grad
from blockops.cli.data import damped_oscillator, oscillator
from blockops.cli.report import fit_slope

EXIT_USAGE = 2


# -- usage errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["demo", "--depth", "0"],
        ["demo", "--width", "x"],
        ["demo", "--damping", "-1"],
        ["demo", "--budget", "forever"],
        ["bench", "--widths", "8,a"],
        ["bench", "--depths", ","],
        ["bench", "--backend", "torch"],
        ["check", "--batch", "-3"],
        ["check", "--no-such-option"],
    ],
)
def test_bad_arguments_give_usage_and_exit_2(argv, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err


@pytest.mark.skipif(cupy_available(), reason="a GPU is present: --backend cupy is valid here")
def test_cupy_backend_without_gpu_is_a_clear_usage_error(capsys):
    assert main(["bench", "--backend", "cupy", "--quick"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "usage:" in err and "CUDA GPU" in err


@pytest.mark.parametrize("command", ["demo", "bench", "check"])
def test_unknown_option_shows_the_subcommand_usage(command, capsys):
    # argparse hands a subparser's leftovers to the top-level parser, which printed the
    # top-level usage: no word of the options the subcommand does take
    assert main([command, "--bogus"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"usage: python -m blockops {command} [-h]" in err
    assert f"python -m blockops {command}: error: unrecognized arguments: --bogus" in err


def test_unknown_option_before_the_subcommand_shows_the_top_level_usage(capsys):
    assert main(["--bogus", "demo"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "usage: python -m blockops [-h]" in err
    assert "python -m blockops: error: unrecognized arguments: --bogus" in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "demo" in capsys.readouterr().out
    assert main(["bench", "--help"]) == 0
    assert "--case-time-cap" in capsys.readouterr().out


def test_missing_matplotlib_is_reported_before_work(monkeypatch, tmp_path, capsys):
    from blockops.cli import report

    real = report.has_module
    monkeypatch.setattr(report, "has_module", lambda name: name != "matplotlib" and real(name))
    assert main(["demo", "--quick", "--plain", "--out", str(tmp_path)]) == 3
    assert "blockops[bench]" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_check_runs_without_rich(monkeypatch, capsys):
    from blockops.cli import report

    real = report.has_module
    monkeypatch.setattr(report, "has_module", lambda name: name != "rich" and real(name))
    assert main(["check", "--depth", "2", "--width", "2", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "== blockops check ==" in out and "PASS" in out  # the plain-text layout


# -- refused before any work: output paths and memory -------------------------------------------
@pytest.fixture
def no_work(monkeypatch):
    """Make every entry into a computation fail the test."""
    from blockops.cli import bench, check, demo

    def forbidden(*args, **kwargs):
        raise AssertionError("computation started")

    for module, name in [
        (demo, "make_problem"),
        (demo, "measure_case"),
        (bench, "measure_case"),
        (check, "make_problem"),
    ]:
        monkeypatch.setattr(module, name, forbidden)


def _machine_with(monkeypatch, gib: int) -> None:
    """Make ``os.sysconf`` report ``gib`` GiB of physical memory."""
    real = getattr(os, "sysconf", None)
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": gib * 2**30 // 4096}

    def sysconf(name):
        return pages[name] if name in pages else real(name)

    monkeypatch.setattr(os, "sysconf", sysconf, raising=False)


def _refused(argv, capsys) -> str:
    """Run ``argv``; check exit 2 within a second and one line on stderr; return it."""
    t0 = time.perf_counter()
    assert main(argv) == EXIT_USAGE
    assert time.perf_counter() - t0 < 1.0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err
    return err


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--quick", "--plain", "--out"],
        ["bench", "--quick", "--plain", "--out"],
        ["check", "--plain", "--json"],
    ],
)
def test_output_under_a_file_is_refused_before_any_work(argv, tmp_path, capsys, no_work):
    # before: the whole run, then NotADirectoryError from os.makedirs at the very end
    parent = tmp_path / "a_file"
    parent.write_text("")
    out = parent / "sub" / ("c.json" if argv[0] == "check" else "out")
    err = _refused([*argv, str(out)], capsys)
    assert err.startswith(f"python -m blockops {argv[0]}: error: {argv[-1]} {out}: ")
    assert f"{parent} is a file, not a folder" in err


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["demo", "bench"])
def test_out_in_proc_is_refused_before_any_work(command, capsys, no_work):
    err = _refused([command, "--quick", "--out", "/proc/blockops_out"], capsys)
    assert "--out /proc/blockops_out: cannot create anything in /proc" in err


def test_an_existing_output_folder_is_accepted_and_left_clean(tmp_path):
    from blockops.cli.preflight import out_folder_problem, output_file_problem

    assert out_folder_problem(str(tmp_path)) is None
    assert out_folder_problem(str(tmp_path / "new" / "deeper")) is None
    assert output_file_problem(str(tmp_path / "new" / "c.json"), "--json") is None
    assert "is a folder" in output_file_problem(str(tmp_path), "--json")
    assert os.listdir(tmp_path) == []  # the probes leave nothing behind


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--depth", "100000000"],
        ["demo", "--quick", "--depths", "100000000"],
        ["bench", "--depths", "100000000", "--max-memory-gb", "1e9"],
        ["check", "--depth", "100000", "--width", "10"],
    ],
)
def test_sizes_beyond_half_the_memory_are_refused_quickly(
    argv, monkeypatch, tmp_path, capsys, no_work
):
    # before: the demo started building a 10^8-layer network (minutes, then out of memory)
    _machine_with(monkeypatch, 16)
    out = [] if argv[0] == "check" else ["--out", str(tmp_path / "out")]
    err = _refused([*argv, *out], capsys)
    assert "more than half of this machine's 16 GB" in err and "smaller --" in err
    assert not (tmp_path / "out").exists()


def test_bench_where_no_case_fits_its_memory_cap_is_refused(monkeypatch, capsys, no_work):
    # before: every case skipped, an empty table, exit 0
    _machine_with(monkeypatch, 16)
    err = _refused(["bench", "--depths", "100000000", "--widths", "8", "--batches", "1"], capsys)
    assert "no case fits in --max-memory-gb 8" in err and "width 8, batch 1" in err


def test_default_sizes_pass_the_memory_guard_of_a_small_machine(monkeypatch):
    from blockops.cli import bench, build_parser, check, demo

    _machine_with(monkeypatch, 4)
    parse = build_parser().parse_args
    for module, argv in [
        (demo, ["demo"]),
        (demo, ["demo", "--quick"]),
        (bench, ["bench"]),
        (bench, ["bench", "--quick"]),
        (check, ["check"]),
    ]:
        assert module.preflight(parse(argv)) is None, argv
    # the bench's default cap follows the machine: the cases above it are skipped
    assert bench.memory_cap_gb(parse(["bench"])) == pytest.approx(2.0)


@pytest.mark.parametrize(("width", "batch"), [(8, 1), (8, 4), (4, 64)])
def test_memory_estimate_bounds_a_measured_case(width, batch):
    # the estimate must not fall below what one bench case really allocates, nor be
    # so loose that it refuses sizes that fit
    import tracemalloc

    from blockops.cli.preflight import case_memory
    from blockops.cli.problem import measure_case

    depth = 24
    # imports, caches and numba's compilation of this case's kernels (a fresh machine
    # compiles them on first use) outside the measurement
    measure_case(depth, width, batch, minres=False)
    tracemalloc.start()
    try:
        measure_case(depth, width, batch, minres=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert 0.95 * peak <= case_memory(depth, width, batch) <= 3.0 * peak


def test_a_blockops_folder_that_is_not_the_package_is_named():
    import types

    from blockops.cli.preflight import package_version, shadowed_package

    assert shadowed_package() is None  # the real package, imported by this test
    fake = types.ModuleType("blockops")
    fake.__path__ = ["/somewhere/blockops"]  # a namespace package: no __file__
    message = shadowed_package(fake)
    assert "/somewhere/blockops" in message and "another folder" in message
    assert package_version() == blockops.__version__


def test_version_without_the_package_attribute(monkeypatch):
    import importlib.metadata
    import types

    from blockops.cli.preflight import package_version

    monkeypatch.setitem(sys.modules, "blockops", types.ModuleType("blockops"))
    try:
        want = importlib.metadata.version("blockops")
    except importlib.metadata.PackageNotFoundError:
        want = "unknown"
    assert package_version() == want


def test_run_from_a_folder_holding_a_blockops_folder(tmp_path):
    # a folder named blockops in the working directory (a clone's parent, say) becomes
    # a namespace package; before: "ImportError: cannot import name '__version__'"
    (tmp_path / "blockops").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "blockops", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    if proc.returncode == 0:  # an install that Python finds before the folder
        assert proc.stdout.startswith("blockops ")
    else:
        assert proc.returncode == 3
        assert str(tmp_path / "blockops") in proc.stderr and "another folder" in proc.stderr


def test_cli_functions_are_short():
    # a function that does not fit on a screen hides its sections: split it instead
    import ast

    import blockops.cli

    folder = pathlib.Path(blockops.cli.__file__).parent
    long = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


# -- the subcommands ---------------------------------------------------------------------------
def test_check_in_process_writes_json(tmp_path, capsys):
    pytest.importorskip("rich")
    path = tmp_path / "sub" / "check.json"
    assert main(["check", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out
    doc = json.loads(path.read_text())
    assert doc["failed"] == 0 and len(doc["checks"]) >= 8
    assert all(c["passed"] for c in doc["checks"])
    assert "numpy" in doc["environment"]["backends"]


def test_check_as_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "blockops", "check", "--plain", "--depth", "3", "--width", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all" in proc.stdout and "checks passed" in proc.stdout
    assert "FAIL" not in proc.stdout


def test_check_fails_with_exit_1_when_a_check_fails(monkeypatch, tmp_path, capsys):
    # corrupt the code under test: the Hessian operator returns twice H v
    from blockops.cli import check

    real = check.hessian_operator

    def doubled(point, damping=0.0, kind="hessian", form="fused"):
        return 2.0 * real(point, damping=damping, kind=kind, form=form)

    monkeypatch.setattr(check, "hessian_operator", doubled)
    path = tmp_path / "c.json"
    assert main(["check", "--plain", "--depth", "3", "--width", "2", "--json", str(path)]) == 1
    assert "FAIL" in capsys.readouterr().out
    result = {c["check"]: c["passed"] for c in json.loads(path.read_text())["checks"]}
    assert result["loss vs plain NumPy"] and result["gradient vs plain NumPy backprop"]
    assert not result["H v (fused) vs finite-difference Hessian"]
    assert not result["H v (literal) vs finite-difference Hessian"]


def _count_axes(monkeypatch) -> dict:
    """Record the number of axes of every figure the CLI saves, by file name."""
    from blockops.cli import report

    real, axes = report._save, {}

    def save(fig, title, path):
        axes[os.path.basename(path)] = len(fig.axes)
        return real(fig, title, path)

    monkeypatch.setattr(report, "_save", save)
    return axes


def test_demo_quick_writes_json_and_figures(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    axes = _count_axes(monkeypatch)
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--quick",
        "--plain",
        "--out",
        str(out),
        "--depths",
        "4,8,12",
        "--steps",
        "3",
        "--newton-time",
        "600",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "MINRES" in text and "Adam" in text and "inertia-controlled Newton" in text
    for name in ("demo.json", "loss_curves.png", "time_vs_depth.png"):
        assert (out / name).stat().st_size > 0
    with open(out / "loss_curves.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    # two panels for the loss curves, one (a single width and batch) against depth
    assert axes == {"loss_curves.png": 2, "time_vs_depth.png": 1}
    doc = json.loads((out / "demo.json").read_text())
    assert doc["point"]["residual"] < 1e-10
    kry = doc["krylov"]
    assert "MINRES + exact (G+λI)^-1" not in kry  # the useless row is gone
    assert kry["GMRES + exact (H+λI)^-1"]["residual"] < 1e-10  # exact preconditioner
    assert kry["GMRES + exact (H+λI)^-1"]["iterations"] <= 2
    assert kry["CG"]["residual"] < 1e-6  # the damped Gauss-Newton system is PD
    assert kry["CG + exact (G+λI)^-1"]["iterations"] == 1
    assert 1 <= kry["MINRES"]["iterations"] <= 100
    assert kry["MINRES + (H+μI)^-1"]["iterations"] >= 1
    assert kry["shift_search"]["tried"][-1][1][:2] == [0, 0]  # μ: H + μI positive definite
    opt = doc["optimizers"]
    names = [o["name"] for o in opt]
    assert names[:2] == ["inertia-controlled Newton", "exact damped Newton (LM)"]
    assert names[-2:] == ["gradient descent", "Adam"]
    assert set(names[2:-2]) <= {"exact Gauss-Newton (LM)"}  # when the build has kind="ggn"
    assert len({o["loss"][0] for o in opt}) == 1  # same start
    for newton in opt[:2]:
        assert newton["steps"] == 3 and newton["loss"][-1] <= newton["loss"][0]
    inertia = opt[0]
    assert all(t[-1][1][:2] == [0, 0] for t in inertia["tried"])
    assert all(b <= a for a, b in itertools.pairwise(inertia["loss"]))
    # equal wall time: every loss read at the end of the shortest run
    t_eq = min(o["time"][-1] for o in opt)
    assert all(o["equal_time"] == pytest.approx(t_eq) for o in opt)
    # equal work: the exact methods read after the fewest factorisations any of them made
    n_eq = min(o["equal_factorizations"] for o in opt[:-2])
    assert n_eq == min(sum(o.get("factorizations", [1] * o["steps"])) for o in opt[:-2])
    assert "equal_factorizations" not in opt[-1]  # Adam factors nothing
    # the main network (quick depth 24) is always one of the points
    assert [r["depth"] for r in doc["depth_scaling"]["records"]] == [4, 8, 12, 24]


def test_demo_same_step_budget_without_figures(tmp_path):
    out = tmp_path / "d2"
    argv = [
        "demo",
        "--quick",
        "--plain",
        "--no-figures",
        "--budget",
        "steps",
        "--steps",
        "2",
        "--newton-time",
        "600",
        "--depth",
        "6",
        "--depths",
        "6",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert sorted(os.listdir(out)) == ["demo.json"]
    doc = json.loads((out / "demo.json").read_text())
    assert {o["steps"] for o in doc["optimizers"]} == {2}


def test_bench_quick_writes_json_and_figure(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    axes = _count_axes(monkeypatch)
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--quick",
        "--depths",
        "4,8",
        "--widths",
        "3",
        "--batches",
        "1,2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "slopes" in capsys.readouterr().out.lower()
    doc = json.loads((out / "bench.json").read_text())
    recs = doc["records"]
    assert {(r["batch"], r["depth"]) for r in recs} == {(1, 4), (1, 8), (2, 4), (2, 8)}
    for r in recs:
        assert r["residual"] < 1e-10
        assert r["minres_iterations"] >= 1
        assert min(r[k] for k in ("gradient", "hvp", "factor", "solve")) > 0
    assert (out / "bench_scaling.png").stat().st_size > 0
    assert axes == {"bench_scaling.png": 2}  # batches 1 and 2 at width 3: no empty panel


def test_bench_time_cap_skips_larger_depths(tmp_path):
    # the first depth always runs; any later one is predicted to exceed a 1 ns cap
    out = tmp_path / "b2"
    argv = [
        "bench",
        "--plain",
        "--no-figures",
        "--depths",
        "4,8,4096",
        "--widths",
        "2",
        "--batches",
        "1",
        "--repeat",
        "1",
        "--case-time-cap",
        "1e-9",
        "--minres-time-cap",
        "1e-9",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    doc = json.loads((out / "bench.json").read_text())
    assert [r["depth"] for r in doc["records"]] == [4]
    assert {s["depth"] for s in doc["skipped"]} == {8, 4096}


def test_bench_prediction_is_linear_in_depth():
    from blockops.cli.bench import _predicted

    last = {"depth": 64, "factor": 1.0, "solve": 0.5, "minres": None}
    assert _predicted(None, 128, ("factor",)) == 0.0
    assert _predicted(last, 256, ("factor", "solve", "minres")) == pytest.approx(6.0)


# -- the CLI's own computations, against independent references --------------------------------
def test_oscillator_solves_its_ode():
    zeta = np.array([0.05, 0.2, 0.5])
    h = 1e-4
    t = np.linspace(0.5, 10.0, 7)[:, None]
    u = oscillator(t, zeta)
    du = (oscillator(t + h, zeta) - oscillator(t - h, zeta)) / (2 * h)
    d2u = (oscillator(t + h, zeta) - 2 * u + oscillator(t - h, zeta)) / h**2
    w0 = 1.5
    np.testing.assert_allclose(d2u + 2 * zeta * w0 * du + w0**2 * u, 0.0, atol=1e-5)
    np.testing.assert_allclose(oscillator(np.zeros(3), zeta), 1.0, rtol=1e-15)
    np.testing.assert_allclose(
        (oscillator(np.full(3, h), zeta) - oscillator(np.full(3, -h), zeta)) / (2 * h),
        0.0,
        atol=1e-7,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_task_shapes_range_and_seed(dtype):
    a, b = damped_oscillator(9, seed=3, dtype=dtype), damped_oscillator(9, seed=3, dtype=dtype)
    assert a.X.shape == (9, 2) and a.y.shape == (9, 1) and a.X.dtype == dtype
    assert np.all(np.abs(a.X) <= 1.0) and np.array_equal(a.X, b.X)
    assert not np.array_equal(a.X, damped_oscillator(9, seed=4).X.astype(dtype))
    with pytest.raises(ValueError, match="n_samples"):
        damped_oscillator(0)


class _Quadratic:
    """f(x) = ½ xᵀ A x - bᵀ x with minimiser A⁻¹ b (closed form, by numpy.linalg)."""

    def __init__(self, n=6, seed=0):
        rng = np.random.default_rng(seed)
        Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
        self.A = Q @ np.diag(np.linspace(1.0, 10.0, n)) @ Q.T
        self.b = rng.standard_normal(n)
        self.xstar = np.linalg.solve(self.A, self.b)
        self.fstar = -0.5 * self.b @ self.xstar

    def __call__(self, x):
        class P:
            pass

        p = P()
        p.gradient = self.A @ x - self.b
        p.loss = 0.5 * x @ self.A @ x - self.b @ x - self.fstar  # 0 at the minimiser
        return p


def test_gradient_descent_and_adam_decrease_a_quadratic():
    f = _Quadratic()
    x0 = np.zeros(6)
    x0_copy = x0.copy()
    x, h = optimizers.gradient_descent(f, x0, lr=0.1, max_steps=200)
    assert h.steps == 200 and len(h.time) == 201
    np.testing.assert_allclose(x, f.xstar, atol=1e-6)
    x, h = optimizers.adam(f, x0, lr=0.05, max_steps=2000)
    assert h.final_loss < 1e-3 * h.loss[0]
    np.testing.assert_array_equal(x0, x0_copy)


def test_time_budget_stops_early():
    f = _Quadratic()
    _, h = optimizers.gradient_descent(f, np.zeros(6), lr=0.1, max_steps=10**9, time_budget=0.02)
    assert 1 <= h.steps < 10**9 and h.time[-1] >= 0.02


def test_damped_newton_converges_like_newton_on_a_quadratic():
    f = _Quadratic()

    def direction(point, lam):  # exact (A + λI)⁻¹ g by numpy.linalg
        return np.linalg.solve(f.A + lam * np.eye(6), point.gradient)

    x, h = optimizers.damped_newton(f, direction, np.zeros(6), damping=1e-3, max_steps=4)
    # the last trial may be rejected: at the minimiser the decrease is round-off
    assert all(h.notes["accepted"][:3])
    np.testing.assert_allclose(x, f.xstar, rtol=1e-8)
    # λ falls on the quadratic (ρ ≈ 1: the model is exact up to the damping)
    assert h.notes["damping"][-1] < h.notes["damping"][0]


def test_damped_newton_rejects_a_bad_step_and_raises_damping():
    f = _Quadratic()

    def overshoot(point, lam):  # 3 x the Newton step: predicted decrease > 0, loss rises
        return 3.0 * np.linalg.solve(f.A, point.gradient)

    x, h = optimizers.damped_newton(f, overshoot, np.zeros(6), damping=1.0, max_steps=3)
    assert h.notes["accepted"] == [False, False, False] and h.notes["indefinite"] == 0
    assert h.notes["damping"] == [1.0, 10.0, 100.0]  # Marquardt: tenfold after a rejection
    np.testing.assert_array_equal(x, np.zeros(6))
    assert h.loss == [h.loss[0]] * 4

    def uphill(point, lam):  # predicted ½(gᵀd + λ‖d‖²) < 0 while λ < 1000
        return -1e-3 * point.gradient

    x, h = optimizers.damped_newton(f, uphill, np.zeros(6), damping=1.0, max_steps=3)
    assert h.notes["indefinite"] == 3 and h.notes["damping"] == [1.0, 10.0, 100.0]
    np.testing.assert_array_equal(x, np.zeros(6))


def test_fit_slope_recovers_power_law():
    d = np.array([64, 128, 256, 512])
    assert fit_slope(d, 3e-5 * d**1.5) == pytest.approx(1.5, abs=1e-12)
    assert fit_slope([64], [1.0]) is None
    assert fit_slope([64, 128], [None, 1.0]) is None


def test_check_reference_gradient_and_hessian_against_finite_differences():
    rng = np.random.default_rng(1)
    sizes = [2, 3, 3, 1]
    n = sum(a * (b + 1) for b, a in itertools.pairwise(sizes))
    x = rng.standard_normal(n)
    X, y = rng.standard_normal((4, 2)), rng.standard_normal((4, 1))
    loss, grad = reference_loss_grad(x, sizes, X, y)
    h = 1e-6
    fd = np.array(
        [
            (
                reference_loss_grad(x + h * e, sizes, X, y)[0]
                - reference_loss_grad(x - h * e, sizes, X, y)[0]
            )
            / (2 * h)
            for e in np.eye(n)
        ]
    )
    np.testing.assert_allclose(grad, fd, atol=1e-8)
    H = reference_hessian(x, sizes, X, y)
    np.testing.assert_allclose(H, H.T, atol=0)
    # second differences of the loss along random directions: vᵀ H v
    for v in rng.standard_normal((3, n)):
        hh = 1e-4
        q = (
            reference_loss_grad(x + hh * v, sizes, X, y)[0]
            - 2 * loss
            + reference_loss_grad(x - hh * v, sizes, X, y)[0]
        ) / hh**2
        assert v @ H @ v == pytest.approx(q, rel=1e-5, abs=1e-6)


def test_damped_newton_raises_damping_while_indefinite():
    f = _Quadratic()
    calls = []

    def direction(point, lam):  # pretend H + λI is indefinite below λ = 1
        calls.append(lam)
        if lam < 1.0:
            return None
        return np.linalg.solve(f.A + lam * np.eye(6), point.gradient)

    _, h = optimizers.damped_newton(f, direction, np.zeros(6), damping=0.01, max_steps=3)
    assert calls[:3] == pytest.approx([0.01, 0.1, 1.0])
    assert h.notes["indefinite"] == 2 and h.notes["accepted"] == [False, False, True]
    assert h.loss[0] == h.loss[1] == h.loss[2] > h.loss[3]


def test_check_reference_ggn_equals_hessian_of_a_linear_model():
    # a linear model with MSE has zero output curvature: H = Jᵀ J / B exactly, and
    # for z = W x + c the Jacobian is known in closed form
    rng = np.random.default_rng(2)
    sizes = [3, 2]
    x = rng.standard_normal(2 * 3 + 2)
    X, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    G = reference_ggn(x, sizes, X)
    Xt = np.hstack([X, np.ones((5, 1))])  # per output i: d z_i / d (W_i, c_i) = [x, 1]
    J = np.zeros((5, 2, 8))
    J[:, 0, [0, 1, 2, 6]] = Xt
    J[:, 1, [3, 4, 5, 7]] = Xt
    J = J.reshape(10, 8)
    np.testing.assert_allclose(G, J.T @ J / 5, atol=1e-9)
    np.testing.assert_allclose(reference_hessian(x, sizes, X, y), G, atol=1e-8)


# -- inertia-controlled Newton ----------------------------------------------------------------
def _dense(op, n: int) -> np.ndarray:
    """The dense matrix of a LinearOperator, column by column."""
    return np.asarray(op.matmat(np.eye(n)))


def _inertia(A: np.ndarray) -> list[int]:
    w = np.linalg.eigvalsh(0.5 * (A + A.T))
    tol = A.shape[0] * np.finfo(float).eps * np.abs(w).max()
    return [int((w < -tol).sum()), int((abs(w) <= tol).sum()), int((w > tol).sum())]


class _LDLInertia:
    """Inertia of ``A + λI`` by Sylvester's law on an LDLᵀ factorisation (scipy)."""

    def __init__(self, A, lam):
        import scipy.linalg

        _, D, _ = scipy.linalg.ldl(A + lam * np.eye(len(A)))
        self.inertia = tuple(_inertia(D))  # D is block diagonal (1x1 and 2x2 blocks)


def test_positive_definite_shift_against_dense_eigvalsh():
    rng = np.random.default_rng(3)
    Q = np.linalg.qr(rng.standard_normal((7, 7)))[0]
    A = Q @ np.diag([-2.5, -0.3, -1e-2, 0.5, 1.0, 4.0, 9.0]) @ Q.T
    F, lam, tried = optimizers.positive_definite_shift(
        lambda point, lam: _LDLInertia(A, lam), None, 1e-3, 10.0, 1e6
    )
    # the first of 1e-3, 1e-2, ... above -μ_min = 2.5, by a dense eigenvalue count
    expected = next(
        1e-3 * 10.0**k
        for k in range(12)
        if np.linalg.eigvalsh(A + 1e-3 * 10.0**k * np.eye(7))[0] > 0
    )
    assert lam == pytest.approx(expected) == pytest.approx(10.0)
    assert [t[0] for t in tried] == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    for mu, inertia in tried:
        assert inertia == _inertia(A + mu * np.eye(7))
    assert tried[-1][1] == [0, 0, 7] and F.inertia == (0, 0, 7)
    with pytest.raises(RuntimeError, match="not positive definite"):
        optimizers.positive_definite_shift(
            lambda p, lam: _LDLInertia(A, lam), None, 1e-3, 10.0, 1.0
        )


def _tiny_problem():
    from blockops.cli.problem import make_problem

    return make_problem(3, 3, 3)  # 25 parameters; H + 1e-3 I has 12 negative eigenvalues


def test_network_inertia_matches_dense_eigvalsh_along_the_shift():
    from blockops.cli.problem import exact_inverse, hessian_operator

    prob = _tiny_problem()
    pt, n = prob.point(), prob.n_params
    H = _dense(hessian_operator(pt), n)
    assert _inertia(H + 1e-3 * np.eye(n))[0] > 0  # indefinite: the search has work to do
    F, lam, tried = optimizers.positive_definite_shift(
        lambda p, mu: exact_inverse(p, mu), pt, 1e-3, 10.0, 1e6
    )
    assert F.inertia == (0, 0, n) and len(tried) >= 2
    for mu, inertia in tried:  # the factorisation's inertia is the eigenvalue count
        assert inertia == _inertia(H + mu * np.eye(n))
    assert tried[-1][1] == [0, 0, n]
    w = np.linalg.eigvalsh(H)
    assert lam > -w[0] >= lam / 10.0  # the first tenfold shift past -μ_min(H)


def test_inertia_newton_on_a_tiny_network():
    from blockops.cli.problem import exact_inverse, hessian_operator

    prob = _tiny_problem()
    n = prob.n_params
    _, h = optimizers.inertia_newton(
        prob.point,
        lambda p, lam: exact_inverse(p, lam),
        prob.x0,
        max_steps=8,
        hvp=lambda p, v: hessian_operator(p).matvec(v),
        options=optimizers.InertiaOptions(damping=1e-3, damping_floor=1e-3),
    )
    assert h.steps == 8 and len(h.notes["tried"]) == 8
    for lam, tried in zip(h.notes["damping"], h.notes["tried"]):
        assert tried[-1] == [lam, [0, 0, n]]  # positive definite at the accepted λ
        assert all(t[1][0] + t[1][1] > 0 for t in tried[:-1])  # and not below it
        assert [t[0] for t in tried] == pytest.approx(
            [tried[0][0] * 10.0**k for k in range(len(tried))]
        )
    assert len(h.notes["tried"][0]) >= 2  # x0 is indefinite: λ was raised
    assert all(b <= a for a, b in itertools.pairwise(h.loss))  # monotone (Armijo)
    assert h.loss[-1] < 0.1 * h.loss[0]
    assert all(s > 0 for s in h.notes["step_size"])
    # the first accepted shift, checked against the dense Hessian at x0
    H0 = _dense(hessian_operator(prob.point()), n)
    assert np.linalg.eigvalsh(H0 + h.notes["damping"][0] * np.eye(n))[0] > 0


def test_inertia_newton_is_newton_on_a_convex_quadratic():
    f = _Quadratic()

    class Exact:  # (A + λI)⁻¹ by numpy.linalg, inertia by LDLᵀ
        def __init__(self, point, lam):
            self.lam, self.inertia = lam, _LDLInertia(f.A, lam).inertia

        def matvec(self, g):
            return np.linalg.solve(f.A + self.lam * np.eye(6), g)

    opts = optimizers.InertiaOptions(damping=1.0, damping_floor=1e-10)
    x, h = optimizers.inertia_newton(f, Exact, np.zeros(6), max_steps=8, options=opts)
    assert all(len(t) == 1 for t in h.notes["tried"])  # A ≻ 0: never raised
    assert h.notes["damping"][:4] == pytest.approx([1.0, 0.1, 0.01, 1e-3])  # ρ ≈ 1: λ / 10
    np.testing.assert_allclose(x, f.xstar, rtol=1e-6)


def test_armijo_backtracking_halves_an_overshooting_step():
    f = _Quadratic()
    x = np.zeros(6)
    pt = f(x)
    d = 3.0 * np.linalg.solve(f.A, pt.gradient)  # 3 x Newton: the loss rises at α = 1
    slope = float(pt.gradient @ d)
    alpha, trial = optimizers.armijo_backtracking(f, x, pt.loss, d, slope, 1e-4, 10)
    assert alpha == 0.5 and trial.loss < pt.loss  # 1.5 x Newton: (1 - 1.5)² < 1
    alpha, trial = optimizers.armijo_backtracking(f, x, pt.loss, -d, -slope, 1e-4, 5)
    assert alpha == 0.0 and trial is None  # uphill: no decrease within 5 halvings


# -- the Krylov rows --------------------------------------------------------------------------
def test_krylov_rows_use_valid_preconditioners(capsys):
    from argparse import Namespace

    from blockops.cli import compare, demo
    from blockops.cli.report import Reporter

    prob = _tiny_problem()
    n, lam = prob.n_params, 1e-3
    x0 = demo._second_order_at_x0(prob, Namespace(damping=lam, seed=0))
    runs, facts = compare.krylov_runs(x0, lam, 50)
    assert [r.label for r in runs] == [
        "MINRES",
        "MINRES + (H+μI)^-1",
        "GMRES + exact (H+λI)^-1",
        "CG",
        "CG + exact (G+λI)^-1",
    ]
    assert _inertia(_dense(x0.Hl, n))[0] > 0  # MINRES's system is indefinite
    for run in runs:
        if run.method == "cg":  # CG needs a positive definite operator
            assert np.linalg.eigvalsh(_dense(run.A, n))[0] > 0
        if run.needs_spd:  # MINRES and CG need a symmetric positive definite M
            M = _dense(run.M, n)
            np.testing.assert_allclose(M, M.T, atol=1e-10 * np.abs(M).max())
            assert np.linalg.eigvalsh(0.5 * (M + M.T))[0] > 0, run.label
    assert [r.label for r in runs if r.needs_spd] == [
        "MINRES + (H+μI)^-1",
        "CG + exact (G+λI)^-1",
    ]
    # μ: the first tenfold shift from λ at which H + μI is positive definite
    w = np.linalg.eigvalsh(_dense(x0.Hl, n)) - lam
    assert facts["mu"] > -w[0] >= facts["mu"] / 10.0
    out = compare.krylov_comparison(Reporter(plain=True), x0, lam, 1e-8, 50)
    assert out["GMRES + exact (H+λI)^-1"]["iterations"] == 1
    assert out["CG + exact (G+λI)^-1"]["iterations"] == 1
    assert out["CG"]["converged"] and out["CG"]["iterations"] <= facts["rank"] + 2
    assert "MINRES + (H+μI)^-1" in capsys.readouterr().out


# -- figures ----------------------------------------------------------------------------------
def _assert_legends_cover_no_axes(fig) -> None:
    fig.tight_layout()
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    for leg in legends:
        box = leg.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (leg, ax.get_title())


def test_panel_grid_leaves_no_empty_panel():
    from blockops.cli.report import panel_grid

    assert [panel_grid(n) for n in (1, 2, 3, 4, 6, 9)] == [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 2),
        (2, 3),
        (3, 3),
    ]
    for n in range(1, 13):
        rows, cols = panel_grid(n)
        assert rows * cols >= n and (rows - 1) * cols < n


@pytest.mark.parametrize(("widths", "batches"), [([8], [4]), ([8, 16, 32], [1]), ([8, 16], [1, 8])])
def test_scaling_figure_one_axes_per_panel_legends_outside_slope_one(widths, batches):
    pytest.importorskip("matplotlib")
    from blockops.cli.report import require_matplotlib, scaling_figure

    depths = [4, 8, 16, 32]
    records = [
        {"width": w, "batch": b, "depth": d, "factor": 1e-3 * d**1.2, "solve": 2e-4 * d}
        for w in widths
        for b in batches
        for d in depths
    ]
    fig = scaling_figure(records, [("factor", "factor"), ("solve", "solve")])
    assert len(fig.axes) == len(widths) * len(batches)
    _assert_legends_cover_no_axes(fig)
    for ax in fig.axes:
        (ref,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("slope 1")]
        d, t = ref.get_data()
        assert np.log(t[-1] / t[0]) / np.log(d[-1] / d[0]) == pytest.approx(1.0)
        assert (d[0], d[-1]) == (4, 32)
    require_matplotlib().close(fig)


def test_loss_figure_two_panels_and_a_legend_outside():
    pytest.importorskip("matplotlib")
    from blockops.cli.report import loss_figure, require_matplotlib

    hists = []
    for k, name in enumerate(["a", "b", "c", "d", "e"]):
        h = optimizers.History(name)
        h.loss = list(np.geomspace(1.0, 10.0 ** -(k + 1), 20))
        h.time = list(np.linspace(0.0, 2.0, 20))
        hists.append(h)
    fig = loss_figure(hists, t_equal=1.5)
    assert len(fig.axes) == 2
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1].startswith("equal time")
    _assert_legends_cover_no_axes(fig)
    require_matplotlib().close(fig)


def test_losses_at_equal_time_and_equal_work():
    from blockops.cli.compare import factorizations_per_iterate, loss_after_factorizations, loss_at

    loss, t = [4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]
    inertia = optimizers.History("i", loss, t, notes={"factorizations": [1, 3, 1]})
    assert [loss_at(inertia, s) for s in (0.5, 1.0, 2.5, 99.0)] == [4.0, 3.0, 2.0, 1.0]
    assert factorizations_per_iterate(inertia) == [0, 1, 4, 5]
    assert [loss_after_factorizations(inertia, n) for n in (0, 3, 4, 9)] == [4.0, 3.0, 2.0, 1.0]
    lm = optimizers.History("lm", loss, t, notes={"damping": [1.0, 10.0, 1.0]})
    assert factorizations_per_iterate(lm) == [0, 1, 2, 3]  # one factorisation per trial
    gd = optimizers.History("gd", loss, t, notes={"lr": 0.1})
    assert factorizations_per_iterate(gd) is None and loss_after_factorizations(gd, 2) is None
