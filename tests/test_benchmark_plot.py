"""The benchmark plot: drawn from printed lines or from a run, with clear errors for bad input.

``python -m benchmarks --plot-from FILE`` reads the ``NAME key=value`` lines a run printed;
``--plot`` draws from the run's own results. Nothing here asserts a timing.
"""

from __future__ import annotations

import math
import struct
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as bench
from benchmarks import plot

LINES = """\
polling_workload tasks=200 slots=20 median_s=90.000 sigma=0.350 seed=2026 time_scale=0.0200
polling contender=kling_async tasks=200 requests_per_task=10.770 polls_per_task=9.770 lag_mean_s=3.057 lag_p95_s=5.939 makespan_ratio=1.089 makespan_over_oracle=1.036 n1303=0
polling contender=kling_async_warm tasks=200 polls_per_task=8.535 lag_mean_s=3.315 makespan_over_oracle=1.033
polling contender=kling_async_list_sweep tasks=200 polls_per_task=2.695 lag_mean_s=1.562 makespan_over_oracle=1.017
polling contender=fixed_6s_jitter tasks=200 polls_per_task=15.865 lag_mean_s=3.101 makespan_over_oracle=1.037
polling contender=fixed_1s tasks=200 polls_per_task=82.520 lag_mean_s=0.634 makespan_over_oracle=1.008
polling_bound contender=kling_async lag_mean_s=3.057 polls_per_task=9.770 known_distribution_polls_per_task=8.487 known_distribution_lag_mean_s=3.057 polls_over_bound=1.151
polling_vs_fixed_6s contender=kling_async polls_ratio=0.616 lag_ratio=0.986 requests_ratio=0.639 makespan_over_oracle=1.036
polling_bound_curve lag_per_poll=0.0200 lag_mean_s=0.876 polls_per_task=31.200
polling_bound_curve lag_per_poll=0.0800 lag_mean_s=1.608 polls_per_task=17.770
polling_bound_curve lag_per_poll=0.3200 lag_mean_s=2.936 polls_per_task=9.115
polling_bound_curve lag_per_poll=1.2800 lag_mean_s=5.306 polls_per_task=5.370
scale tracked_jobs=10000 bytes_per_job=542
"""  # noqa: E501 (lines as a run prints them)

CALLBACK_LINES = """\
callbacks_workload tasks=200 slots=20 median_s=90.000 sigma=0.350 seed=2026 time_scale=0.0500
callbacks tasks=200 ended=200 requests_per_task=2.000 makespan_over_oracle=1.001
callbacks_detail contender=callbacks gets_confirm_per_task=1.000
polling tasks=200 ended=200 requests_per_task=10.790 makespan_over_oracle=1.036
callbacks-terminal tasks=200 ended=200 requests_per_task=2.090 makespan_over_oracle=1.001
"""


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data[-8:-4] == b"IEND"
    return width, height


def close(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return math.isclose(a[0], b[0], abs_tol=1e-9) and math.isclose(a[1], b[1], abs_tol=1e-9)


def test_plot_from_lines_draws_what_was_printed(tmp_path: Path) -> None:
    saved = tmp_path / "run.txt"
    saved.write_text(LINES)
    figures = plot.figures_from_file(saved)
    assert figures.workload == plot.WorkloadInfo(200, 20, 90.0, 0.35, 2026, 0.02)
    assert [c.name for c in figures.contenders] == [
        "kling_async",
        "kling_async_warm",
        "kling_async_list_sweep",
        "fixed_6s_jitter",
        "fixed_1s",
    ]
    assert figures.callbacks == {}  # no callbacks suite in this file

    image = tmp_path / "plot.png"
    drawn = plot.draw(figures, image)
    assert png_size(image) == plot.SIZE_PX

    # The plot's artists hold the printed figures, and nothing else.
    assert drawn.points.keys() == {c.name for c in figures.contenders}
    assert close(drawn.points["kling_async"], (3.057, 9.770))
    assert close(drawn.points["fixed_1s"], (0.634, 82.520))
    assert close(drawn.points["kling_async_list_sweep"], (1.562, 2.695))
    assert len(drawn.curve) == 4
    assert all(
        close(a, b)
        for a, b in zip(
            drawn.curve,
            [(0.876, 31.2), (1.608, 17.77), (2.936, 9.115), (5.306, 5.37)],
            strict=True,
        )
    )
    assert drawn.bounds.keys() == {"kling_async"}
    assert close(drawn.bounds["kling_async"], (3.057, 8.487))
    assert [name for name, _ in drawn.makespan] == [c.name for c in figures.contenders]
    assert [ratio for _, ratio in drawn.makespan] == pytest.approx(
        [1.036, 1.033, 1.017, 1.037, 1.008]
    )
    assert drawn == plot.series(figures)  # what series() says is what the image holds


def test_the_callbacks_suite_joins_the_makespan_panel(tmp_path: Path) -> None:
    figures = plot.figures_from_lines((LINES + CALLBACK_LINES).splitlines())
    # The callbacks suite's own ``polling`` line (no contender field) is not a polling contender.
    assert len(figures.contenders) == 5
    assert figures.callbacks == {"callbacks": 1.001, "polling": 1.036, "callbacks-terminal": 1.001}
    assert figures.callbacks_workload is not None
    assert figures.callbacks_workload.time_scale == 0.05
    drawn = plot.draw(figures, tmp_path / "plot.png")
    assert [name for name, _ in drawn.makespan][-3:] == [
        plot.CALLBACKS_LABELS["callbacks"],
        plot.CALLBACKS_LABELS["polling"],
        plot.CALLBACKS_LABELS["callbacks-terminal"],
    ]
    assert [ratio for _, ratio in drawn.makespan][-3:] == pytest.approx([1.001, 1.036, 1.001])


def test_the_cli_draws_from_a_saved_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved = tmp_path / "run.txt"
    saved.write_text(LINES)
    image = tmp_path / "sub" / "figure.png"
    bench.main(["--plot-from", str(saved), "--plot-file", str(image)])
    assert png_size(image) == plot.SIZE_PX
    out, err = capsys.readouterr()
    assert out == ""  # stdout is for result lines only
    assert str(image) in err


@pytest.mark.parametrize(
    ("change", "where", "says"),
    [
        # A field missing from a contender's line.
        (("lag_mean_s=3.101 ", ""), "line 5 (polling)", "field 'lag_mean_s' is missing"),
        # A garbled number.
        (("polls_per_task=82.520", "polls_per_task=82,5"), "line 6 (polling)", "'82,5'"),
        (("makespan_over_oracle=1.017", "makespan_over_oracle=nan"), "line 4", "not a finite"),
        # A word that is not key=value.
        (
            ("polls_per_task=5.370", "polls_per_task 5.370"),
            "line 12 (polling_bound_curve)",
            "'polls_per_task' is not a key=value field",
        ),
        # The workload's fields.
        (("seed=2026", "seed=twenty"), "line 1 (polling_workload)", "seed='twenty' is not an int"),
        (("slots=20 ", ""), "line 1 (polling_workload)", "field 'slots' is missing"),
        (
            ("known_distribution_polls_per_task=8.487 ", ""),
            "line 7 (polling_bound)",
            "field 'known_distribution_polls_per_task' is missing",
        ),
    ],
)
def test_a_missing_or_garbled_field_names_the_line_and_the_field(
    tmp_path: Path, change: tuple[str, str], where: str, says: str
) -> None:
    assert change[0] in LINES
    saved = tmp_path / "run.txt"
    saved.write_text(LINES.replace(change[0], change[1], 1))
    with pytest.raises(plot.PlotInputError) as error:
        plot.figures_from_file(saved)
    message = str(error.value)
    assert f"{saved} {where}" in message
    assert says in message


@pytest.mark.parametrize(
    ("drop", "says"),
    [
        ("polling_workload", "no polling_workload line"),
        ("polling_bound_curve", "no polling_bound_curve line"),
        ("polling contender", "no 'polling contender=...' line"),
    ],
)
def test_a_missing_line_is_named(drop: str, says: str) -> None:
    lines = [line for line in LINES.splitlines() if not line.startswith(drop)]
    with pytest.raises(plot.PlotInputError, match=says):
        plot.figures_from_lines(lines, "run.txt")


def test_two_runs_in_one_file_are_refused() -> None:
    with pytest.raises(plot.PlotInputError, match="keep one run per file"):
        plot.figures_from_lines((LINES + LINES).splitlines())


def test_the_cli_reports_bad_input_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "run.txt"
    saved.write_text(LINES.replace("lag_mean_s=0.634 ", ""))
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--plot-from", str(saved), "--plot-file", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "line 6 (polling): field 'lag_mean_s' is missing" in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):
        bench.main(["--plot-from", str(tmp_path / "absent.txt")])
    assert "cannot read" in capsys.readouterr().err


def test_without_matplotlib_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(plot.PlotUnavailableError, match=r"\[bench\] extra"):
        plot.require_matplotlib()
    # Parsing needs no matplotlib: a saved run can be checked anywhere.
    assert plot.figures_from_lines(LINES.splitlines()).workload.tasks == 200


def test_plot_checks_for_matplotlib_before_running_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["polling", "--plot"])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert "kling-async[bench]" in err
    assert out == ""  # not even the workload line: no suite ran


def test_plot_needs_the_polling_suite(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench.main(["decode", "--plot"])
    assert "--plot draws the polling suite" in capsys.readouterr().err


def test_a_quick_real_run_plots_what_it_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two contenders, 20 tasks at 200x: a few seconds. The image drawn by ``--plot`` holds the
    figures of the very lines the run printed (to their three decimals)."""
    drawn: list[plot.Series] = []
    original = plot.draw

    def recording(figures: plot.Figures, path: Path) -> plot.Series:
        drawn.append(original(figures, path))
        return drawn[-1]

    monkeypatch.setattr(plot, "draw", recording)
    image = tmp_path / "run.png"
    bench.main(
        [
            "polling",
            "--tasks",
            "20",
            "--time-scale",
            "0.005",
            "--contender",
            "kling_async",
            "--contender",
            "fixed_6s_jitter",
            "--plot",
            "--plot-file",
            str(image),
        ]
    )
    assert png_size(image) == plot.SIZE_PX
    printed = plot.figures_from_lines(capsys.readouterr().out.splitlines())
    assert [c.name for c in printed.contenders] == ["kling_async", "fixed_6s_jitter"]
    (series,) = drawn
    expected = plot.series(printed)
    assert series.points.keys() == expected.points.keys()
    for name, point in expected.points.items():
        assert series.points[name] == pytest.approx(point, abs=5e-4)
    assert len(series.curve) == len(expected.curve) > 0
    for a, b in zip(series.curve, expected.curve, strict=True):
        assert a == pytest.approx(b, abs=5e-4)
    assert series.bounds.keys() == {"kling_async"}
    assert [n for n, _ in series.makespan] == [n for n, _ in expected.makespan]
    assert [r for _, r in series.makespan] == pytest.approx(
        [r for _, r in expected.makespan], abs=5e-4
    )
