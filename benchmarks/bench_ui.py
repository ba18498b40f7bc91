"""How long the widget blocks napari's UI thread: the longest stall from clicking Run until the
result layers are on screen and the event loop idles.

    python benchmarks/bench_ui.py [--repeats 3] [--warm 3] [--cases image stack] [--out FILE]

Without a display the script re-runs itself under ``xvfb-run -a``. Each repetition is a fresh
process (a subprocess of this script), so the first Run in it is a user's first Run: napari's
Shapes code has never run, the widget module and torch's autograd are imported and used for the
first time, and no numba function comes from napari's on-disk cache (``NUMBA_CACHE_DIR`` points
at a new empty folder for every process, so napari's ``cache=True`` functions compile again).

In each process: a napari Viewer with the synthetic sample (``synthetic_image``, 256 x 256, or
``synthetic_stack``, 16 frames of 192 x 192), then, inside the running event loop, the widget is
opened as the plugin menu does (its module imported, ``GradCamWidget(viewer)`` docked). As soon
as the bundled model is ready (the widget loads it on a worker), the controls are set (the
stack: scope "whole stack", target "every class found") and Run is clicked
(``run_button.native.click()``); then Run again ``--warm`` times, each once the previous run's
layers are on screen and the loop has idled for ``--idle`` seconds.

A QTimer ticks every 20 ms on the UI thread (a precise timer); a stall is the gap between two
ticks minus 20 ms. For each run: the longest stall and the 95th percentile of the stalls from the
click until ``--idle`` seconds after the result layers exist (their first paint included), and
the run's wall time (click to layers). "opening" is the same from docking the widget until its
model is ready. The UI thread's CPU time between two ticks is
reported too: on a shared, loaded machine the wall-clock stall also counts the time the OS gave
the CPU to other processes, the CPU burst does not (nor waits for the GIL). Reported: medians over the processes (the first run: one per process; later
runs: each process's median first), with the range of the longest stalls.

Targets: longest stall <= 250 ms on the first Run, <= 50 ms on later runs.

To see what fills a stall: ``BENCH_UI_PROFILE=ui.prof xvfb-run -a python benchmarks/bench_ui.py
--child image`` runs one process and writes a cProfile of its UI thread.

A benchmark, not a test: it asserts nothing and is never run by the test suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TICK_MS = 20
TARGETS_MS = {"first": 250, "later": 50}


# ---- the child: one fresh process, one viewer ------------------------------------------------

def _stalls(ticks: list[tuple[float, float]], t0: float, t1: float) -> dict:
    """Longest and 95th-percentile stall (ms) of the ticks' gaps that overlap [t0, t1], and
    the most CPU time the UI thread spent between two ticks ("cpu": the stall an idle machine
    would show, less waits for the GIL; on a loaded machine the wall-clock stall grows)."""
    pairs = [(a, b) for a, b in itertools.pairwise(ticks) if b[0] >= t0 and a[0] <= t1]
    gaps = sorted(max(0.0, (b[0] - a[0]) * 1000 - TICK_MS) for a, b in pairs) or [0.0]
    cpu = max(((b[1] - a[1]) * 1000 for a, b in pairs), default=0.0)
    p95 = gaps[min(len(gaps) - 1, round(0.95 * (len(gaps) - 1)))]
    return {"max": gaps[-1], "p95": p95, "cpu": cpu}


def child(args) -> None:
    import napari
    from qtpy.QtCore import Qt, QTimer
    from qtpy.QtWidgets import QApplication

    from napari_gradcam._napari import sample_data

    sample = sample_data.synthetic_stack() if args.child == "stack" else \
        sample_data.synthetic_image()
    data, kwargs, _kind = sample[0]
    viewer = napari.Viewer(show=True)
    image = viewer.add_image(data, **kwargs)
    app = QApplication.instance()
    ticks: list[tuple[float, float]] = []
    out: dict = {"runs": []}
    state: dict = {"phase": "settle", "since": time.perf_counter()}

    def widget_done():
        w = state.get("widget")
        return w is not None and not w.running and not w.loading and \
            any(layer.name.startswith("gradcam") for layer in viewer.layers)

    def open_widget():
        state["t0"] = time.perf_counter()
        from napari_gradcam._napari.widget import GradCamWidget  # as the plugin menu does

        w = GradCamWidget(viewer)
        viewer.window.add_dock_widget(w, name="Grad-CAM", area="right")
        state["widget"] = w
        state["phase"] = "opening"

    def click():
        w = state["widget"]
        if args.child == "stack" and not out["runs"]:
            w.scope.value = "whole stack"
            w.target.value = "every class found"
        state["t0"] = time.perf_counter()
        w.run_button.native.click()
        state["phase"] = "running"

    def tick():
        now = time.perf_counter()
        ticks.append((now, time.thread_time()))
        phase = state["phase"]
        if phase == "settle" and now - state["since"] > 1.0:  # the viewer is up and idle
            state["phase"] = "waiting"
            QTimer.singleShot(0, open_widget)
        elif phase == "opening" and not state["widget"].loading:
            out["open"] = {"wall": now - state["t0"], **_stalls(ticks, state["t0"], now)}
            state["phase"] = "waiting"
            QTimer.singleShot(0, click)
        elif phase == "running" and widget_done():
            state.update(phase="idle", done=now)
        elif phase == "idle" and now - state["done"] > args.idle:
            run = {"wall": state["done"] - state["t0"],
                   **_stalls(ticks, state["t0"], now)}
            out["runs"].append(run)
            if len(out["runs"]) > args.warm:
                state["phase"] = "end"
                out["regions"] = sum(len(layer.data) for layer in viewer.layers
                                     if layer.name.startswith("regions"))
                out["status"] = str(state["widget"].status.value)
                QTimer.singleShot(0, app.quit)
            else:
                state["phase"] = "waiting"
                QTimer.singleShot(0, click)

    timer = QTimer()
    timer.setTimerType(Qt.PreciseTimer)
    timer.timeout.connect(tick)
    timer.start(TICK_MS)
    profile = os.environ.get("BENCH_UI_PROFILE")  # a file: cProfile of the UI thread
    if profile:
        import cProfile

        cProfile.runctx("app.exec_()", globals(), {"app": app}, profile)
    else:
        app.exec_()
    timer.stop()
    out["shape"] = list(image.data.shape)
    print("RESULT " + json.dumps(out))


# ---- the parent: fresh processes, the table ------------------------------------------------

def one_process(args, case: str) -> dict:
    cache = tempfile.mkdtemp(prefix="bench-ui-numba-")
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", case,
               "--warm", str(args.warm), "--idle", str(args.idle)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False,
                              timeout=args.timeout)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the {case} process failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _row(label: str, runs: list[dict], target: int | None) -> str:
    longest = [r["max"] for r in runs]
    med = statistics.median(longest)
    ok = "" if target is None else (" yes" if med <= target else " **no**")
    return (f"| {label} | {med:.0f} ({min(longest):.0f}-{max(longest):.0f}) | "
            f"{statistics.median(r['p95'] for r in runs):.0f} | "
            f"{statistics.median(r['cpu'] for r in runs):.0f} | "
            f"{statistics.median(r['wall'] for r in runs):.2f} | "
            f"{'' if target is None else f'<= {target}'}{ok} |")


def table(args) -> list[str]:
    rows = [("| case | run | longest stall, ms: median (range) | p95 stall (ms) "
             "| longest UI-thread CPU burst (ms) | wall (s) | target (ms) |"),
            "|---|---|---|---|---|---|---|"]
    for case in args.cases:
        results = [one_process(args, case) for _ in range(args.repeats)]
        what = {"image": "single image, predicted class",
                "stack": "16-frame stack, whole stack, every class found"}[case]
        first = [r["runs"][0] for r in results]
        later = [{k: statistics.median(run[k] for run in r["runs"][1:])
                  for k in ("max", "p95", "cpu", "wall")} for r in results if len(r["runs"]) > 1]
        rows.append(_row(f"{what} | opening the widget (until its model is ready)",
                         [r["open"] for r in results], None))
        rows.append(_row(f"{what} | first Run (fresh process)", first, TARGETS_MS["first"]))
        if later:
            rows.append(_row(f"{what} | later Runs ({args.warm} per process)", later,
                             TARGETS_MS["later"]))
        print(f"{case}: {results[0]['regions']} regions; status: {results[0]['status']}",
              file=sys.stderr)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per case")
    p.add_argument("--warm", type=int, default=3, help="later runs per process")
    p.add_argument("--idle", type=float, default=0.5,
                   help="seconds measured after the layers exist (their paint)")
    p.add_argument("--cases", nargs="+", choices=["image", "stack"], default=["image", "stack"])
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    p.add_argument("--child", choices=["image", "stack"], help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    if not os.environ.get("DISPLAY") and not os.environ.get("BENCH_UI_XVFB"):
        if shutil.which("xvfb-run") is None:
            raise SystemExit("no display and no xvfb-run: install xvfb or run under a display.")
        os.environ["BENCH_UI_XVFB"] = "1"
        os.execvp("xvfb-run", ["xvfb-run", "-a", sys.executable, os.path.abspath(__file__),
                               *argv])

    import torch

    head = (f"## UI-thread stalls: {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}; {args.repeats} fresh processes per case, "
            f"{args.warm} later runs each, a {TICK_MS} ms QTimer on the UI thread, "
            f"a fresh NUMBA_CACHE_DIR per process")
    print(head)
    print()
    rows = table(args)
    print("\n".join(rows))
    if args.out:
        with open(args.out, "w") as f:
            f.write(head + "\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
