"""The benchmark's markdown report and headline lines."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Sequence


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- report
def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** -digits:
            return f"{value:.1e}"
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def markdown(results: dict) -> str:
    """The human-readable report: the main table first, then the sections behind it."""
    env = results["environment"]
    lines = [f"# cxrserve benchmark{' (' + results['tag'] + ')' if results.get('tag') else ''}", ""]
    lines.append(f"{env['created']} | {env['cpu']}, {env['cores']} cores, {env['memory_gb']} GB | "
                 f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, torchserve {env['torchserve']} | "
                 f"load average {env['load_average_start'][0]} at start, "
                 f"{env.get('load_average_end', ['?'])[0]} at end | device {env['device']}"
                 + (f" ({env['gpu']})" if env.get("gpu") and env["device"] == "cuda" else "")
                 + f" | {results.get('elapsed_s', '?')} s")
    lines.append("")
    if results.get("gpu_note"):
        lines += [f"**{results['gpu_note']}.**", ""]
    kinds: dict[str, int] = {}
    for i in results["inputs"]:
        key = f"{i['format']}{' ' + i['syntax'] if i['syntax'] else ''}"
        kinds[key] = kinds.get(key, 0) + 1
    mpx = [i["megapixels"] for i in results["inputs"]]
    lines += [f"Inputs: {len(results['inputs'])} {results['inputs'][0]['source'] if results['inputs'] else ''} files "
              f"({', '.join(f'{n} {k}' for k, n in kinds.items())}), {min(mpx):.1f}-{max(mpx):.1f} Mpx, cycled. "
              "Modes: *scores* = default request; *pictures* = with the model's heatmap/saliency/overlay.", ""]
    lines += ["## Throughput and latency", "",
              "x naive: throughput / naive baseline (same mode, same run). ceiling: share of the forward passes "
              "alone at their best batch size. max diff: largest |difference| of the main scores from the naive "
              "outputs. CPU: CPU seconds per wall second (server processes for TorchServe rows). RSS: peak, MB "
              "(whole bench process in process; TorchServe frontend + all workers for TorchServe rows).", ""]
    rows = []
    for name, entry in results["models"].items():
        for r in entry["rows"]:
            cpu = r.get("server_cpu_util", r.get("cpu_util"))
            rss = r.get("server_rss_peak_mb", r.get("rss_peak_mb"))
            rows.append([name, r["path"] + (f" ({r['variant']})" if r.get("variant") else ""), r["mode"], r["backend"],
                         r["batch"], r["clients"], _fmt(r.get("throughput"), 2), _fmt(r.get("p50_ms"), 0),
                         _fmt(r.get("p99_ms"), 0), _fmt(r.get("vs_naive"), 2),
                         f"{r['of_ceiling'] * 100:.0f}%" if r.get("of_ceiling") else "-",
                         _fmt(r.get("max_abs_diff"), 6) if r["path"] != "naive" else "(ref)",
                         _fmt(cpu, 2), _fmt(rss, 0) + (f" ({r['errors']} errors)" if r.get("errors") else "")])
    lines += _table(["model", "path", "mode", "backend", "batch", "clients", "studies/s", "p50 ms", "p99 ms",
                     "x naive", "ceiling", "max diff", "CPU", "RSS MB"], rows)
    lines.append("")
    for name, entry in results["models"].items():
        for note in entry.get("notes", []):
            lines.append(f"* {name}: {note}")
    ts = results.get("torchserve", {})
    if ts.get("error"):
        lines.append(f"* TorchServe section failed: {ts['error']}")
    elif ts:
        pss = ", ".join(f"{n} {e['worker_pss_mb']}" for n, e in results["models"].items() if "worker_pss_mb" in e)
        lines.append(f"* TorchServe: {ts['models']} models in {ts['processes']} processes, ready in {ts['start_s']} s; "
                     f"idle RSS {ts['idle_rss_mb']} MB, PSS {ts['idle_pss_mb']} MB (shared library pages counted "
                     f"once); worker PSS after the run, MB: {pss}")
    lines.append("")

    ceiling_rows = []
    for name, entry in results["models"].items():
        for backend, c in entry.get("ceiling", {}).items():
            for part, p in c["components"].items():
                lp = p.get("low_precision")
                ceiling_rows.append([name, part, p["backend"], p["best_batch"], _fmt(p["ms_per_image"], 1),
                                     ", ".join(f"{b}: {v:.1f}" for b, v in p["by_batch"].items()),
                                     f"{lp['dtype']} {lp['ms_per_image']:.1f} ms (max diff {lp['max_abs_diff_first_output']:.1e})"
                                     if lp else "-"])
            ceiling_rows.append([name, "**all (per study)**", backend, "", _fmt(c["ms_per_study"], 1),
                                 f"**{_fmt(c['studies_per_s'], 2)} studies/s**", ""])
    if ceiling_rows:
        lines += ["## Ceiling: forward passes alone", "",
                  "ms per image at each batch size; the best batch size counts. Low precision is an opt-in "
                  "measurement (autocast), not what is served: it breaks the 1e-4 parity of the exported models.", ""]
        lines += _table(["model", "component", "backend", "best batch", "ms/image", "ms/image by batch",
                         "low precision"], ceiling_rows)
        lines.append("")

    stage_rows = []
    for name, entry in results["models"].items():
        for backend, stages in entry.get("stages_ms", {}).items():
            total = sum(stages.values()) or 1
            slowest = max(stages, key=stages.get) if stages else "-"
            stage_rows.append([name, backend, ", ".join(f"{k} {v:.1f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1])),
                               f"{slowest} ({stages.get(slowest, 0) / total * 100:.0f}%)"])
    if stage_rows:
        lines += ["## Stages (in process, ms per study)", ""]
        lines += _table(["model", "backend", "stages, slowest first", "slowest"], stage_rows)
        lines.append("")

    if results.get("decode"):
        lines += ["## Decode", ""]
        lines += _table(["input", "Mpx", "MB", "decode ms", "to uint8 ms", "ms/Mpx"],
                        [[d["name"], d["megapixels"], f"{d['bytes'] / 2**20:.2f}", _fmt(d["decode_ms"]),
                          _fmt(d["uint8_ms"]), _fmt(d["ms_per_megapixel"])] for d in results["decode"]])
        lines.append("")
    if results.get("preprocess"):
        lines += [f"## Preprocessing (one {results['preprocess']['image']} image)", ""]
        lines += _table(["pipeline or step", "ms"],
                        [[("`" + r["name"] + "`") if r["kind"] == "pipeline" else r["name"], _fmt(r["ms"])]
                         for r in results["preprocess"]["rows"]])
        lines.append("")
    if results.get("threads"):
        key = next(k for k in results["threads"][0] if k.startswith("threads"))
        steps = ", ".join(results.get("threads_preprocessing") or ())  # older results: not recorded
        lines += [f"## Decode + preprocess ({steps or 'every component'}) of a batch of 4: serial vs {key[:-3]}", ""]
        lines += _table(["input", "Mpx", "serial ms", f"{key[:-3]} ms", "speed-up"],
                        [[t["input"], t["megapixels"], _fmt(t["serial_ms"], 0), _fmt(t[key], 0), _fmt(t["speedup"], 2)]
                         for t in results["threads"]])
        lines.append("")
    growth = results.get("growth")
    if growth:
        lines += ["## How cost grows", "", f"### Image size ({growth['model']}, in process, one study at a time)", ""]
        lines += _table(["image", "Mpx", "p50 ms", "decode ms", "RSS growth MB"],
                        [[g["size"], g["megapixels"], _fmt(g["p50_ms"], 0), _fmt(g["stages_ms"].get("decode"), 0),
                          g["rss_growth_mb"]] for g in growth["image_size"]])
        lines += ["", f"### Batch size ({growth['model']}, in process)", ""]
        lines += _table(["batch", "studies/s", "p50 ms", "RSS growth MB"],
                        [[g["batch"], _fmt(g["throughput"], 2), _fmt(g["p50_ms"], 0), g["rss_growth_mb"]]
                         for g in growth["batch"]])
        for table in growth.get("tables", ()):  # what a model's own growth measure (Served.bench_growth) adds
            lines += ["", f"### {table['title']}", ""]
            lines += _table(table["columns"], table["rows"])
        if growth.get("clients"):
            lines += ["", f"### Concurrent clients (TorchServe REST, {results.get('sweep_model', '')})", ""]
            lines += _table(["clients", "studies/s", "p50 ms", "p99 ms", "TorchServe RSS MB", "worker RSS MB", "CPU"],
                            [[g["clients"], _fmt(g["throughput"], 2), _fmt(g["p50_ms"], 0), _fmt(g["p99_ms"], 0),
                              g["server_rss_peak_mb"], g["worker_rss_peak_mb"], _fmt(g["server_cpu_util"], 2)]
                             for g in growth["clients"]])
        lines.append("")
    for name, composed in (results.get("composed") or {}).items():
        lines += ["", f"### {name}", "", composed.get("markdown", "").rstrip()]
    return "\n".join(lines)


def headline(results: dict) -> list[str]:
    """One line per model: best served throughput vs naive, and vs the ceiling; the study's line last."""
    out = []
    for name, entry in results["models"].items():
        naive = next((r for r in entry["rows"] if r["path"] == "naive" and r["mode"] == "scores"), None)
        for path in ("torchserve", "in-process"):
            best = entry.get("best", {}).get(path)
            if best:
                out.append(f"{name}: best {path} {best['throughput']:.2f} studies/s ({best['path']}, "
                           f"{best['backend']}, {best['clients']} client(s)) = {_fmt(best.get('vs_naive'), 2)}x naive"
                           + (f" ({naive['throughput']:.2f}/s)" if naive else "")
                           + (f", {best['of_ceiling'] * 100:.0f}% of the ceiling" if best.get("of_ceiling") else ""))
    out += [c["headline"] for c in (results.get("composed") or {}).values() if c.get("headline")]
    return out


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = results["environment"]["created"].replace(":", "").replace("-", "").replace("+0000", "Z")
    stem = f"bench-{stamp}-{results['environment']['device']}" + (f"-{results['tag']}" if results.get("tag") else "")
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text(markdown(results) + "\n")
    return json_path, md_path
