"""What the layer benchmark shows and writes: a table per shape and routing on the terminal, the
JSON of every number, and a PNG of time per token against tokens (one line per system, the
min-max spread shaded, the roofline dashed)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from moec.errors import InputError

SHOWN = ("hf", "torch.compile", "ort-moe", "moec")  # table/plot columns; hf = best hf-* impl
SHORT_IMPL = {"hf-eager": "eager", "hf-grouped_mm": "grouped", "hf-batched_mm": "batched"}


def preamble(results: dict[str, Any]) -> None:
    h, t = results["host"], results["threads"]
    load = results["load_average_start"]
    print(f"moec layer bench: {h['cpu']} ({h['llvm_mcpu']}, {h['cores']} cores, "
          f"AVX2 {'yes' if h['avx2'] else 'no'}, AVX-512 {'yes' if h['avx512f'] else 'no'}), "
          f"{results['dtype']}; bf16 {results['bf16']}")
    print(f"threads {t['threads']} everywhere (torch.set_num_threads, TVM_NUM_THREADS, ORT "
          f"intra_op_num_threads; OMP_WAIT_POLICY=PASSIVE, ORT spinning off)")
    note = "" if load[0] < 0.5 * (h["cores"] or 1) else (
        "  <- the machine is busy: timings are noisy, compare systems within a row")
    print(f"load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}{note}")


def limits_line(lim: dict[str, Any], when: str = "start") -> None:
    bw, g = lim["bandwidth"], lim["gemm"]
    tvm = (f", moec TVM linear {g['tvm_gflops']:.0f}" if g["tvm_gflops"] is not None else
           f", moec TVM linear not measured ({g['tvm_error']})" if g["tvm_error"] else "")
    rd = (f", TVM 4-stream read {bw['tvm_read_gbs']:.1f}" if bw.get("tvm_read_gbs") is not None
          else f", TVM read not measured ({bw['tvm_error']})" if bw.get("tvm_error") else "")
    bf = (f", torch linear bf16 {g['torch_bf16_gflops']:.0f}"
          if g.get("torch_bf16_gflops") is not None else "")
    print(f"limits at {when}: memory bandwidth {bw['gbs']:.1f} GB/s (copy {bw['copy_gbs']:.1f}, "
          f"read {bw['read_gbs']:.1f}{rd}); {'GEMM' if bf else 'fp32 GEMM'} {g['n']}^3 "
          f"{g['gflops']:.0f} GFLOP/s (torch.matmul {g['torch_gflops']:.0f}{tvm}{bf})",
          flush=True)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def best(systems: dict[str, Any], column: str) -> tuple[str, dict[str, Any]] | None:
    """(system name, its summary) shown in `column`: for "hf" the fastest hf-* that passed."""
    if column != "hf":
        s = systems.get(column)
        return (column, s) if s is not None else None
    ok = [(n, s) for n, s in systems.items() if n.startswith("hf-") and s["status"] == "ok"]
    if ok:
        return min(ok, key=lambda ns: ns[1]["median_s"])
    return ("hf-eager", systems["hf-eager"]) if "hf-eager" in systems else None


def _cell(entry: tuple[str, dict[str, Any]] | None, column: str) -> str:
    if entry is None:
        return "n/a"
    name, s = entry
    if s["status"] == "ok":
        text = f"{_ms(s['median_s'])} ({_ms(s['min_s'])}-{_ms(s['max_s'])})"
        return f"{text} {SHORT_IMPL[name]}" if column == "hf" else text
    if s["status"] == "wrong":
        return f"WRONG {s['max_rel_err']:.0e}"
    return s["status"]


def _ratio(a: tuple[str, dict] | None, b: tuple[str, dict] | None) -> str:
    if a is None or b is None or a[1]["status"] != "ok" or b[1]["status"] != "ok":
        return "-"
    return f"{a[1]['median_s'] / b[1]['median_s']:.2f}"


def format_table(results: dict[str, Any]) -> str:
    """The terminal table: one block per shape and routing, times in ms as median (min-max)."""
    lines: list[str] = []
    head = (f"{'tokens':>6} | {'roofline':>11} | {'hf (fastest impl)':<28} | "
            f"{'torch.compile':<21} | {'ort-moe':<21} | {'moec':<21} | "
            f"{'moec speed-up x':<17} | {'moec / roof':>11} | {'load':>4}")
    sub = (f"{'':>6} | {'ms':>11} | {'ms median (min-max)':<28} | {'':<21} | {'':<21} | "
           f"{'':<21} | {'hf':>5} {'tc':>5} {'ort':>5} | {'run':>5} {'now':>5} | {'':>4}")
    for shape_name, shape in results["shapes"].items():
        lines.append("")
        lines.append(f"== {shape_name}: {shape['description']}")
        comp = ", ".join(f"{k} {v:.1f} s" for k, v in shape["compile_s"].items())
        if comp:
            lines.append(f"   compile/prepare: {comp} (torch.compile: first call at each token "
                         f"count)")
        for name, note in shape["notes"].items():
            if name in ("moec", "ort-moe", "torch.compile") or "FALLBACK" in note:
                lines.append(f"   {name}: {note}")
        for kind, why in shape["missing"].items():
            lines.append(f"   {kind}: not run: {why}")
        for routing in results["options"]["routings"]:
            cases = [c for c in results["cases"]
                     if c["shape"] == shape_name and c["routing"] == routing]
            if not cases:
                continue
            st = cases[-1]["routing_stats"]
            lines.append(f"-- routing {routing}: busiest expert takes "
                         f"{100 * st['top_expert_share']:.1f}% of the (token, slot) pairs, the "
                         f"top 10% of experts {100 * st['top10pct_share']:.0f}% "
                         f"(T={cases[-1]['tokens']})")
            lines += [head, sub]
            for c in cases:
                sy = c["systems"]
                cols = {col: best(sy, col) for col in SHOWN}
                roof = c.get("roofline")
                rtxt = (f"{_ms(roof['t_s'])} {'bw' if roof['bound'] == 'bandwidth' else 'mm'}"
                        if roof else "-")
                m = cols["moec"]
                ok = bool(m and m[1]["status"] == "ok")
                vs_roof = f"{m[1]['median_s'] / roof['t_s']:.2f}" if roof and ok else "-"
                now = c.get("roofline_now")
                vs_now = f"{m[1]['median_s'] / now['t_s']:.2f}" if now and ok else "-"
                lines.append(
                    f"{c['tokens']:>6} | {rtxt:>11} | {_cell(cols['hf'], 'hf'):<28} | "
                    f"{_cell(cols['torch.compile'], ''):<21} | {_cell(cols['ort-moe'], ''):<21} | "
                    f"{_cell(m, ''):<21} | {_ratio(cols['hf'], m):>5} "
                    f"{_ratio(cols['torch.compile'], m):>5} {_ratio(cols['ort-moe'], m):>5} | "
                    f"{vs_roof:>5} {vs_now:>5} | {c['load_average'][1]:>4.1f}")
            for c in cases:
                for name, s in c["systems"].items():
                    if s["status"] not in ("ok",) and not (s["status"] == "skipped"
                                                           and name == "hf-batched_mm"):
                        lines.append(f"   T={c['tokens']} {name}: {s['status']}: {s['detail']}")
    lines.append("")
    lines.append("roofline: max(bytes of the distinct experts touched + router + shared + "
                 "activations / bandwidth, FLOPs / GEMM rate); bw = bandwidth-bound, mm = "
                 "GEMM-bound. speed-up = other's median / moec's median. moec / roof: run = "
                 "against the roofline at the run's best limits, now = at the median bandwidth "
                 "of a TVM read after each of the case's own timed rounds.")
    return "\n".join(lines)


def _clean(v: Any) -> Any:
    """JSON without NaN/Infinity (not JSON): non-finite floats become strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def plot(results: dict[str, Any], path: Path) -> None:
    from moec.profile import matplotlib_figure

    Figure = matplotlib_figure("the bench plot")
    from matplotlib.ticker import NullLocator
    shapes = list(results["shapes"])
    routings = list(results["options"]["routings"])
    fig = Figure(figsize=(5.5 * len(routings), 4.2 * len(shapes)))
    axes = fig.subplots(len(shapes), len(routings), squeeze=False)
    colors = {"hf": "tab:blue", "torch.compile": "tab:orange", "ort-moe": "tab:green",
              "moec": "tab:red"}
    for r, shape in enumerate(shapes):
        for c, routing in enumerate(routings):
            ax = axes[r][c]
            cases = sorted((x for x in results["cases"]
                            if x["shape"] == shape and x["routing"] == routing),
                           key=lambda x: x["tokens"])
            for col in SHOWN:
                pts = []
                for x in cases:
                    e = best(x["systems"], col)
                    if e and e[1]["status"] == "ok":
                        t = x["tokens"]
                        pts.append((t, e[1]["median_s"] / t, e[1]["min_s"] / t,
                                    e[1]["max_s"] / t))
                if pts:
                    ts, med, lo, hi = (list(v) for v in zip(*pts, strict=True))
                    ax.plot(ts, [1e3 * v for v in med], "o-", color=colors[col], label=col)
                    ax.fill_between(ts, [1e3 * v for v in lo], [1e3 * v for v in hi],
                                    color=colors[col], alpha=0.15)
            roof = [(x["tokens"], x["roofline"]["t_s"] / x["tokens"]) for x in cases
                    if "roofline" in x]
            if roof:
                ax.plot([t for t, _ in roof], [1e3 * v for _, v in roof], "k--",
                        label="roofline")
            ax.set_xscale("log", base=2)
            ax.set_xticks([x["tokens"] for x in cases], [str(x["tokens"]) for x in cases])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.set_xlabel("tokens")
            ax.set_ylabel("ms per token")
            ax.set_title(f"{shape}, {routing} routing", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    h = results["host"]
    fig.suptitle(f"moec layer bench, {results['dtype']}, {results['threads']['threads']} threads, "
                 f"{h['cpu']} "
                 f"({h['llvm_mcpu']}); load {results['load_average_start'][0]:.1f}",
                 fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, path)


def write(results: dict[str, Any], json_path: Path, plot_png: bool = True) -> None:
    """Print the table; write the JSON and (plot_png) the PNG next to it."""
    lim = results["limits"]
    limits_line(lim["end"], "end")
    rounds = lim.get("rounds_best_gbs")
    rtxt = f", the reads between rounds (best {rounds:.1f} GB/s)" if rounds else ""
    print(f"roofline from the best of both{rtxt}: {lim['bandwidth_gbs']:.1f} GB/s, "
          f"{lim['gemm_gflops']:.0f} GFLOP/s")
    print(format_table(results))
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(json_path.name + ".tmp")  # a crash leaves the old file whole
    tmp.write_text(json.dumps(_clean(results), indent=1) + "\n")
    os.replace(tmp, json_path)
    print(f"wrote {json_path}")
    if plot_png:
        png = json_path.with_suffix(".png")
        try:
            plot(results, png)
        except InputError as e:  # matplotlib is optional
            print(f"no plot: {e}")
            return
        print(f"wrote {png}")
