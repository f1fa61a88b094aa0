"""The one markdown table of `benchmarks/gpu.sh`, built from what its parts left in a folder.

    python -m benchmarks.gpu_table runs/gpu        # prints it and writes runs/gpu/gpu.md

`gpu.sh` runs each part under a time limit and leaves, per part id (`PARTS`): `<id>.status`
(`rc seconds limit_s`, or `skipped <reason>`), `<id>.log` (its stdout and stderr) and
`<id>.jsonl` (the rows its benchmark appended with `--json`), plus `device.txt`,
`settings.txt` (`key value` lines) and, for part e, the run directory `e_run/`. Every part
gets at least one row: its results, or FAILED / TIMEOUT / SKIPPED with the tail of its
log, so that one broken part never hides the others' figures.
"""

import json
import os
import re
import sys

# id -> what it measures (the script's order). c runs once per dtype.
PARTS = {
    "a": "image steps/s, host-fed vs device-resident data (benchmarks/image_loop.py)",
    "b": "AdaLFL / baseline step time of the image models (benchmarks/image_step.py)",
    "b-profile": "profile of the image model with the worst ratio (image_step.py --profile)",
    "c-bf16": "transformer step MFU, bfloat16 (benchmarks/transformer_step.py)",
    "c-f32": "transformer step MFU, float32 (benchmarks/transformer_step.py)",
    "d": "AntGoal env steps/s (benchmarks/goal_envs.py)",
    "e": "AntGoal ML³ vs PPO (experiments.run), in the time left",
}
MODELS = {
    "lenet5": "LeNet-5",
    "vgg16": "VGG-16",
    "allcnn_c": "All-CNN-C",
    "resnet20": "ResNet-20",
    "resnet44": "ResNet-44",
    "resnet56": "ResNet-56",
    "wrn16_8": "WRN-16-8",
    "wrn28_10": "WRN-28-10",
}
STEPS = {
    "ce": "CE step",
    "phase1": "Phase 1 meta step",
    "phase2": "Phase 2 step",
    "phase2_prefix": "Phase 2 step, shared prefix",
}
HEADER = "| part | measurement | result | details |"


def _cell(text: str) -> str:
    """`text` fit for one table cell: one line, no bare pipes."""
    return re.sub(r"\s+", " ", str(text)).replace("|", "\\|").strip()


def tail_text(text: str, lines: int = 4, chars: int = 400) -> str:
    """The last `lines` non-empty lines of `text` (without Python's warnings), as one line."""
    kept = [x.strip() for x in str(text).splitlines() if x.strip()]
    kept = [x for x in kept if not re.search(r"Warning|warnings\.warn", x)] or kept
    return " ⏎ ".join(kept[-lines:])[-chars:] or "empty"


def tail(path: str) -> str:
    """`tail_text` of a log file."""
    if not os.path.exists(path):
        return "no log"
    with open(path, errors="replace") as f:
        return tail_text(f.read())


def read_jsonl(path: str) -> list[dict]:
    """The JSON rows of a file (a torn last line, from a killed part, is dropped)."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return rows


def read_status(path: str) -> dict:
    """`<id>.status`: {"rc", "seconds", "limit_s"}, {"skipped": why}, or {"missing": True}."""
    if not os.path.exists(path):
        return {"missing": True}
    with open(path) as f:
        words = f.read().split()
    if words and words[0] == "skipped":
        return {"skipped": " ".join(words[1:])}
    rc, seconds, limit = (int(w) for w in words[:3])
    return {"rc": rc, "seconds": seconds, "limit_s": limit}


def _failed(row: dict, what: str) -> tuple[str, str, str]:
    return what, "FAILED", tail_text(row["failed"])


def rows_a(rows: list[dict]) -> list[tuple[str, str, str]]:
    out = []
    for r in rows:
        rates = {p: v["steps_per_s"] for p, v in r["paths"].items()}
        result = " · ".join(f"{p} {v:,.1f}" for p, v in rates.items())
        values = list(rates.values())
        if len(values) > 1:
            result += f" ({values[-1] / values[0]:.2f}×)"
        first = ", ".join(f"{p} {v['first_chunk_s']:.0f} s" for p, v in r["paths"].items())
        out.append(
            (
                f"steps/s, {MODELS.get(r['model'], r['model'])} {r['algorithm']}, "
                f"batch {r['batch']}",
                result,
                f"median of {r['chunks']} chunks of {r['chunk']} steps; first chunk "
                f"(compilation): {first}",
            )
        )
    return out


def rows_b(rows: list[dict]) -> list[tuple[str, str, str]]:
    out = []
    for r in rows:
        if "profile" in r:
            out.append(_profile_row(r))
            continue
        name = MODELS.get(r["model"], r["model"])
        if "failed" in r:
            out.append(_failed(r, f"AdaLFL / baseline, {name}"))
            continue
        out.append(
            (
                f"AdaLFL / baseline step time, {name}, batch {r['batch']}",
                f"{r['ratio']:.2f}",
                f"baseline {r['baseline_ms']:.2f} ms, AdaLFL {r['adalfl_ms']:.2f} ms, "
                f"fwd {r['forward_ms']:.2f} ms, fwd+bwd {r['fwd_bwd_ms']:.2f} ms; peak "
                f"{r['adalfl_peak_gib']:.2f} GiB ({r['mem_kind']}); compile "
                f"{r['baseline_compile_s']:.0f} / {r['adalfl_compile_s']:.0f} s",
            )
        )
    return out


def _profile_row(r: dict) -> tuple[str, str, str]:
    p = r["profile"]
    if p is None:
        return _failed(r, f"profile of the worst ratio, {MODELS.get(r['model'], r['model'])}")
    base, ada = p["baseline"], p["adalfl"]
    what = f"profile of the worst ratio, {MODELS.get(p['model'], p['model'])}"
    flops = ada["gflop"] / base["gflop"] if base["gflop"] else float("nan")
    gbytes = ada["gbytes"] / base["gbytes"] if base["gbytes"] else float("nan")
    result = f"AdaLFL {flops:.2f}× the FLOPs, {gbytes:.2f}× the bytes of the baseline"
    details = []
    for name, s in (("baseline", base), ("AdaLFL", ada)):
        ops = ", ".join(f"{k} {v}" for k, v in s["ops"].items()) or "none"
        text = f"{name}: {s['gflop']:.3g} GFLOP, {s['gbytes']:.3g} GB, ops {ops}"
        if "device_ms" in s:
            kinds = ", ".join(f"{k} {100 * v:.0f} %" for k, v in s["kinds"].items())
            top = "; ".join(f"{n[:50]} {ms:.3f} ms" for n, ms, _ in s["top"][:3])
            text += f"; device {s['device_ms']:.3f} ms/step ({kinds}); top: {top}"
        elif "note" in s:
            text += f"; {s['note']}"
        details.append(text)
    details.append(f"traces: {os.path.dirname(ada['trace'])}")
    return what, result, " — ".join(details)


def rows_c(rows: list[dict]) -> list[tuple[str, str, str]]:
    out = []
    for r in rows:
        what = f"transformer `{r['size']}`, {r['dtype']}, {STEPS.get(r['kind'], r['kind'])}"
        if "failed" in r:
            out.append(_failed(r, what))
            continue
        mfu = "—" if r["mfu"] is None else f"MFU {100 * r['mfu']:.1f} %"
        tflops = "—" if r["tflops"] is None else f"{r['tflops']:.3g}"
        out.append(
            (
                what,
                mfu,
                f"{r['ms']:.2f} ms/step, {r['tokens_per_s']:,.0f} tokens/s, {tflops} TFLOP/s, "
                f"compile {r['compile_s']:.1f} s, peak {r['peak_mib']:,.0f} MiB "
                f"({r['memory_kind']}); {r['peak_name']}",
            )
        )
    return out


def rows_d(rows: list[dict]) -> list[tuple[str, str, str]]:
    return [
        (
            f"{r['env']} env steps/s, batch {r['batch']}",
            f"{r['steps_per_s']:,.0f}",
            f"{r['steps']} steps per call (random actions); compile + first call "
            f"{r['first']:.1f} s",
        )
        for r in rows
    ]


def _mean_std(v) -> str:
    """'mean ± std' of the experiment's `mean_std` dicts; a plain value as it is."""
    if isinstance(v, dict) and "mean" in v:
        return f"{v['mean']:.3g} ± {v['std']:.2g}"
    return str(v)


def rows_e(folder: str) -> list[tuple[str, str, str]]:
    """The finished run's headline numbers from its summary.json (none if unfinished)."""
    path = os.path.join(folder, "e_run", "summary.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        s = json.load(f)
    out = []
    for method, label in (("ml3", "ML³ loss"), ("ppo", "PPO (brax)")):
        if method not in s:
            continue
        m = s[method]
        out.append(
            (
                f"{s.get('env', '?')}: {label}, {s.get('budget_samples', '?')} samples per policy",
                f"final return {_mean_std(m['final_return'])}",
                f"from {_mean_std(m['initial_return'])}; samples to 80 % of its improvement "
                f"(per seed): {m['samples_to_80pct_own_final']}; mean goal distance "
                f"{_mean_std(m['initial_mean_distance'])} → {_mean_std(m['mean_distance'])}",
            )
        )
    return out


def last_progress(log: str) -> str:
    """The run's last progress line ('train: step 40/200 (20%), ... ETA ...'), if any."""
    if not os.path.exists(log):
        return ""
    with open(log, errors="replace") as f:
        lines = [x.strip() for x in f if re.match(r"\w+: step \d+/\d+|PPO seed \d+ goal", x)]
    return lines[-1] if lines else ""


def _resume(folder: str) -> str:
    """What re-running part e on the same folder does."""
    checkpoints = os.path.join(folder, "e_run", "checkpoints")
    found = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
    steps = [int(d) for d in found if d.isdigit()]
    if not steps:
        return "no checkpoint was written yet (a re-run starts it again)"
    return f"a re-run on the same --out resumes it from its checkpoint at step {max(steps)}"


def part_rows(folder: str, part: str, settings: dict | None = None) -> list[tuple[str, str, str]]:
    """Every row of one part: its results, then a row for a failure, time-out or skip."""
    status = read_status(os.path.join(folder, f"{part}.status"))
    log = os.path.join(folder, f"{part}.log")
    if "missing" in status:
        return [(PARTS[part], "NOT RUN", "not in --parts")]
    if "skipped" in status:
        return [(PARTS[part], "SKIPPED", status["skipped"])]
    rows = read_jsonl(os.path.join(folder, f"{part}.jsonl"))
    try:
        if part == "e":
            results = rows_e(folder)
        else:
            builder = {"a": rows_a, "b": rows_b, "b-profile": rows_b, "d": rows_d}
            results = builder.get(part, rows_c)(rows)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:
        results = [(PARTS[part], "FAILED", f"its results could not be read: {err!r}")]
    rc, seconds, limit = status["rc"], status["seconds"], status["limit_s"]
    if rc in (124, 137):
        progress = last_progress(log) if part == "e" else ""
        results.append(
            (
                PARTS[part],
                f"TIMEOUT after {seconds} s (time guard {limit} s)",
                (f"{(settings or {}).get('e_config', '?')}; " if part == "e" else "")
                + (f"last progress: {progress}; " if progress else "")
                + (f"{_resume(folder)}; " if part == "e" else "rows above: what finished; ")
                + f"log tail: {tail(log)}",
            )
        )
    elif rc != 0:
        results.append((PARTS[part], f"FAILED (exit {rc}, {seconds} s)", tail(log)))
    elif not results:
        results.append((PARTS[part], "FAILED (no results)", tail(log)))
    return results


def table(folder: str) -> str:
    """The markdown page: device and settings, the table, each part's seconds."""
    settings = {}
    path = os.path.join(folder, "settings.txt")
    if os.path.exists(path):
        with open(path) as f:
            settings = dict(line.rstrip("\n").split(" ", 1) for line in f if " " in line)
    device = "unknown"
    path = os.path.join(folder, "device.txt")
    if os.path.exists(path):
        with open(path) as f:
            device = " · ".join(x.strip() for x in f if x.strip()) or device
    dry = settings.get("dry") == "1"
    lines = [
        "# GPU figures (benchmarks/gpu.sh)"
        + (" — DRY RUN: tiny sizes, timings meaningless" if dry else ""),
        "",
        f"Device: {device}",
        f"Started {settings.get('started', '?')}; budget {settings.get('budget_s', '?')} s; "
        f"parts {settings.get('parts', '?')}.",
        "",
        HEADER,
        "|---|---|---|---|",
    ]
    seconds = []
    for part in PARTS:
        for what, result, details in part_rows(folder, part, settings):
            lines.append(f"| {part[0]} | {_cell(what)} | {_cell(result)} | {_cell(details)} |")
        status = read_status(os.path.join(folder, f"{part}.status"))
        if "rc" in status:
            seconds.append(f"{part} {status['seconds']} s (limit {status['limit_s']} s)")
    lines += ["", "Seconds per part: " + ("; ".join(seconds) or "none") + ".", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python -m benchmarks.gpu_table FOLDER")
    text = table(argv[1])
    with open(os.path.join(argv[1], "gpu.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv)
