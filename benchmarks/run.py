"""One benchmark command: every figure next to its target and baseline.

    python benchmarks/run.py [--quick] [--gpu]     # make bench-quick / make bench / bench-gpu

Runs each measurement in its own process (bench_host per stage and preprocessing path, the
memory runs at 1x and 4x, the model-bound check, bench_io) and writes
``benchmarks/results.json`` (``--quick``: ``results-quick.json``) and a markdown table beside it.
A figure with a target is ``{"value", "unit", "target", "better", "baseline"}``; ``before``
(with ``--before <checkout of the older commit>``) is the same figure measured from that
checkout's featcache in the same run, interleaved with the current runs.

Marginal and fixed main-process CPU: each stage also runs bench_host at 4x its items (for
extract_clip_grid that is the 4x memory run); with ``M(k)`` the main CPU of a run of ``k`` items,
``cpu_ms_main_marginal = (M(4n) - M(n)) / (4n - n)`` per item and ``fixed_ms_main = M(n) - n *
marginal`` per run (worker start, planning, index, metrics), so ``cpu_ms_main`` at n is
``marginal + fixed / n``. The same for the host part (less ``cpu_ms_main_device``). They carry
the per-item target as ``compare`` (for comparison only: the targets stay on the figures at n).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PY = sys.executable
SIZES = {  # items per stage: (quick, full)
    "clip_grid": (60, 400), "dinov2": (60, 400), "siglip": (15, 100), "sam2": (6, 24)}
MAIN_TARGET = {"clip_grid": 0.5, "dinov2": 0.5, "siglip": 0.3, "sam2": 2.0}
UNIT = {"siglip": "ms/crop"}
FAST_STAGES = ("clip_grid", "dinov2", "sam2")   # the stages with a `preprocess` param


def sub(args: list[str], timeout: int = 900, src: Path | None = None) -> dict:
    """Run one benchmark script here; ``src``: import featcache from that source tree (the
    ``--before`` checkout) instead of this one."""
    out = HERE / ".tmp.json"
    out.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(src)) if src else None
    subprocess.run([PY, *args, "--json", str(out)], cwd=HERE, check=True, timeout=timeout,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    data = json.loads(out.read_text())
    out.unlink()
    return data


def fig(value: float, unit: str, target: float | None, better: str, baseline: float | None,
        before: float | None = None, note: str = "") -> dict:
    d = {"value": round(value, 3), "unit": unit, "target": target, "better": better,
         "baseline": None if baseline is None else round(baseline, 3)}
    if before is not None:
        d["before"] = round(before, 3)
    if note:
        d["note"] = note
    if target is not None:
        d["met"] = value <= target if better == "lower" else value >= target
    return d


def host_figures(stage: str, run: dict, before: dict | None, fast: dict | None) -> dict:
    unit = UNIT.get(stage, "ms/image")
    naive = run["naive"]["decode_preprocess_ms"]
    b = before or {}
    out = {
        "cpu_ms_all": fig(run["cpu_ms_all"], unit, round(1.2 * naive, 3), "lower", naive,
                          b.get("cpu_ms_all"), "target: 1.2x the naive decode+preprocess"),
        "cpu_ms_main": fig(run["cpu_ms_main"], unit, MAIN_TARGET[stage], "lower",
                           naive + run["naive"]["save_ms"], b.get("cpu_ms_main"),
                           "baseline: the naive path runs all of it in its one process"),
        "cpu_ms_main_host": fig(_host(run), unit, MAIN_TARGET[stage], "lower", None,
                                _host(b) if b else None,
                                "main process less its CPU-device work (stack, normalise, "
                                "null forward, storage cast), which a GPU does"),
        "feed_16_cores": fig(16000 / run["cpu_ms_all"], unit.replace("ms/", "") + "s/s", None,
                             "higher", 16000 / naive, 16000 / b["cpu_ms_all"] if b else None),
        "feed_one_main": fig(1000 / run["cpu_ms_main"], unit.replace("ms/", "") + "s/s", None,
                             "higher", None, 1000 / b["cpu_ms_main"] if b else None),
        "phases_ms": {k: round(v, 3) for k, v in run["phases_ms"].items()},
        "naive": {k: round(v, 3) for k, v in run["naive"].items()},
        "items": run["items"], "inputs": run["inputs"], "wall_s": round(run["wall_s"], 2),
    }
    if fast is not None:
        out["fast_cpu_ms_all"] = fig(fast["cpu_ms_all"], unit,
                                     2.0 if stage == "clip_grid" else None, "lower", naive)
        out["fast_cpu_ms_main"] = fig(fast["cpu_ms_main"], unit, MAIN_TARGET[stage], "lower",
                                      None)
        out["fast_phases_ms"] = {k: round(v, 3) for k, v in fast["phases_ms"].items()}
    return out


def _host(run: dict) -> float:
    return run["cpu_ms_main"] - run.get("cpu_ms_main_device", 0.0)


def marginal_figures(stage: str, small: dict, large: dict) -> dict:
    """Per-item main CPU of the extra items from ``small`` (n) to ``large`` (4n), and the fixed
    cost per run that remains; the same for the host part (main less device-side work)."""
    unit = UNIT.get(stage, "ms/image")
    n, big = small["items"], large["items"]
    out: dict = {"marginal_items": [n, big]}
    for name, per_item in (("main", lambda r: r["cpu_ms_main"]), ("main_host", _host)):
        total_n, total_big = per_item(small) * n, per_item(large) * big
        m = (total_big - total_n) / (big - n)
        out[f"cpu_ms_{name}_marginal"] = {
            "value": round(m, 3), "unit": unit, "compare": MAIN_TARGET[stage],
            "note": f"(main CPU at {big} - at {n} items) / {big - n}; 'compare' is the "
                    f"per-item target of cpu_ms_{name}, for comparison only"}
        out[f"fixed_ms_{name}"] = {"value": round(total_n - n * m, 1), "unit": "ms/run",
                                   "note": f"main CPU of the {n}-item run less {n} x marginal"}
    return out


def best(runs: list[dict]) -> dict:
    """The run with the lowest total CPU (the least disturbed by the rest of the machine)."""
    return min(runs, key=lambda r: r["cpu_ms_all"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="bench_gpu.py (other arguments go there)")
    ap.add_argument("--before", default="", help="a checkout of the older commit (git "
                    "worktree): its host cost is measured in the same run, as 'before'")
    args, rest = ap.parse_known_args()
    if args.gpu:
        sys.exit(subprocess.call([PY, str(HERE / "bench_gpu.py"), *rest]))
    if rest:
        ap.error(f"unknown arguments {rest}")
    before_src = Path(args.before).resolve() / "src" if args.before else None
    t0 = time.perf_counter()
    q = 0 if args.quick else 1
    repeats = 1 if args.quick else 2
    res: dict = {"machine": machine(), "mode": "quick" if args.quick else "full",
                 "host": {}, "notes": []}
    at_n: dict[str, dict] = {}   # the run at n each stage's figures come from
    fast_ok = _has_fast_path()
    for stage, sizes in SIZES.items():
        n = sizes[q]
        common = ["bench_host.py", "--stage", stage, "--items", str(n),
                  "--naive-items", str(min(n, 40))]
        runs, befores = [], []
        for _ in range(repeats):   # interleaved: the machine's load hits both alike
            runs.append(sub(common))
            if before_src:
                befores.append(sub(common, src=before_src))
        fast = best([sub(common + ["--preprocess", "fast"])]) \
            if fast_ok and stage in FAST_STAGES else None
        before = best(befores) if befores else None
        at_n[stage] = best(runs)
        res["host"][stage] = host_figures(stage, at_n[stage], before, fast)
        if stage != "clip_grid" and not args.quick:   # clip_grid's: the 4x memory run
            large = sub(["bench_host.py", "--stage", stage, "--items", str(4 * n),
                         "--naive-items", "4", "--phase-items", "4"])
            res["host"][stage].update(marginal_figures(stage, at_n[stage], large))
    n = SIZES["clip_grid"][q]
    mem = {k: sub(["bench_host.py", "--stage", "clip_grid", "--items", str(k * n),
                   "--naive-items", "4", "--phase-items", "4"]) for k in (1, 4)}
    res["host"]["clip_grid"].update(marginal_figures("clip_grid", at_n["clip_grid"], mem[4]))
    if args.quick:
        res["notes"].append("quick: marginal and fixed main CPU for clip_grid only (from its "
                            "memory runs); make bench runs the other stages at 4x too")
    res["memory"] = {
        f"peak_rss_{k}x_mb": {"main": round(m["peak_rss_main_mb"], 1),
                              "worker": round(m["peak_rss_worker_mb"], 1), "items": m["items"]}
        for k, m in mem.items()}
    growth = mem[4]["peak_rss_main_mb"] / mem[1]["peak_rss_main_mb"]
    res["memory"]["main_growth_4x"] = fig(growth, "x", 1.1, "lower", 4.0,
                                          note="peak RSS at 4x over 1x; 4.0 = linear")
    res["model_bound"] = sub(["bench_model.py", *(["--images", "16", "--batch-size", "8"]
                                                  if args.quick else ["--images", "96"])])
    mb = res["model_bound"]
    mb["ratio"] = fig(mb["ratio_items"], "x", 0.95, "higher", 1.0,
                      note=f"items/s: {mb['images']} images, batch {mb['batch_size']}, 1 thread")
    mb["rows_ratio"] = fig(mb["ratio_rows"], "x", None, "higher", 1.0,
                           note=f"rows/s: {mb['stage_rows']} rows (items + padding of each "
                                f"shard's last batch) over the forward's rows/s")
    mb["padding"] = fig(mb["padding_share"], "x", None, "lower", None,
                        note=f"padded rows / rows; at scale "
                             f"~{mb['padding_share_at_scale_est']:.4f} (estimate: (b-1)/2 per "
                             f"shard of {mb['target_items']} items)")
    res["preprocess"] = sub(["bench_preprocess.py", *(["--images", "12", "--feature-images",
                             "2", "--sam2-images", "1"] if args.quick else [])])
    res["io"] = sub(["bench_io.py", "--items", "500" if args.quick else "2000",
                     "--dvc-items", "2000" if args.quick else "20000"], timeout=1200)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    name = "results-quick" if args.quick else "results"
    (HERE / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    table = markdown(res)
    (HERE / f"{name}.md").write_text(table)
    print(table)


def _has_fast_path() -> bool:
    import dataclasses

    from featcache.stages._grids import GridParams

    return any(f.name == "preprocess" for f in dataclasses.fields(GridParams))


def machine() -> dict:
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text()
                .splitlines() if ln.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available()}


def _cell(f: dict) -> list[str]:
    met = "" if f.get("target") is None else (" ✅" if f["met"] else " ❌")
    target = "" if f.get("target") is None else str(f["target"])
    if f.get("compare") is not None:   # another figure's target, shown for comparison only
        target = f"({f['compare']}, compare only)"
    return [f"{f['value']}{met}", target,
            "" if f.get("baseline") is None else str(f["baseline"]),
            "" if f.get("before") is None else str(f["before"]), f["unit"]]


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, CUDA "
             f"{'yes' if m['cuda'] else 'no'}; mode {res['mode']}, {res['wall_s']} s.", "",
             "| figure | value | target | baseline | before | unit |",
             "| --- | --- | --- | --- | --- | --- |"]
    for stage, h in res["host"].items():
        for key in ("cpu_ms_all", "cpu_ms_main", "cpu_ms_main_marginal", "fixed_ms_main",
                    "cpu_ms_main_host", "cpu_ms_main_host_marginal", "fixed_ms_main_host",
                    "feed_16_cores", "feed_one_main", "fast_cpu_ms_all", "fast_cpu_ms_main"):
            if key in h:
                lines.append("| " + " | ".join([f"{stage} {key}", *_cell(h[key])]) + " |")
    lines.append("| " + " | ".join(["memory main_growth_4x",
                                     *_cell(res["memory"]["main_growth_4x"])]) + " |")
    lines.append("| " + " | ".join(["preprocess fast host (640x480)",
                                     *_cell(res["preprocess"]["fast_host_ms"])]) + " |")
    mb = res["model_bound"]
    for label, key in (("model_bound stage/forward (items)", "ratio"),
                       ("model_bound stage/forward (rows)", "rows_ratio"),
                       ("model_bound padding share", "padding")):
        lines.append("| " + " | ".join([label, *_cell(mb[key])]) + " |")
    runs = ", ".join(f"{r:.2f}" for r in mb["forward_img_s_runs"])
    lines += ["", (f"Model-bound check (ViT-B-16, random weights, {mb['images']} images, batch "
                   f"{mb['batch_size']}, 1 thread, 2 workers): {mb['summary']} Pure forward "
                   f"runs before/after the stage: {runs} rows/s; the model was busy "
                   f"{100 * mb['stage_model_share']:.0f}% of the stage's wall.")]
    lines += ["", "| phase (ms per item) | " + " | ".join(res["host"]) + " |",
              "| --- |" + " --- |" * len(res["host"])]
    for ph in ("decode", "preprocess", "transfer", "write"):
        lines.append(f"| {ph} | " + " | ".join(str(h["phases_ms"].get(ph, ""))
                                               for h in res["host"].values()) + " |")
    io = res["io"]
    lines += ["", "| layout | write MB/s | files | disk MB |", "| --- | --- | --- | --- |"]
    for name, d in io["layouts"].items():
        lines.append(f"| {name} | {d['write_mb_s']:.0f} | {d['files']} | {d['disk_mb']:.1f} |")
    r = io["reader"]
    lines += ["", f"Reader (FeatureDataset, random order): {r['workers_1_items_s']:.0f} items/s "
              f"with 1 worker, {r['workers_4_items_s']:.0f} with 4.", "",
              f"| DVC, {io['dvc']['items']} items | files | add s | push s | pull s |",
              "| --- | --- | --- | --- | --- |"]
    for name in ("sharded", "per_item"):
        d = io["dvc"][name]
        lines.append(f"| {name} | {d['files']} | {d['add_s']:.1f} | {d['push_s']:.1f} | "
                     f"{d['pull_s']:.1f} |")
    mem = res["memory"]
    lines += ["", f"Peak RSS main/worker: 1x {mem['peak_rss_1x_mb']['main']}/"
              f"{mem['peak_rss_1x_mb']['worker']} MB, 4x {mem['peak_rss_4x_mb']['main']}/"
              f"{mem['peak_rss_4x_mb']['worker']} MB."]
    if res["notes"]:
        lines += [""] + [f"Note: {note}" for note in res["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
