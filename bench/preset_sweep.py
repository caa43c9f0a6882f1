"""Sweep generation settings of the packaged model through the quality gate: adherence (and each aspect), the
Fréchet distance and seconds per image for each setting, on the same held-out captions and seeds.

    python bench/preset_sweep.py [--count 64] [--json bench/results/preset_sweep.json] [--svg docs/preset_sweep.svg]
    python bench/preset_sweep.py --count 256 --only default fast balanced      # certify chosen settings
    python bench/preset_sweep.py --presets --count 256 --certify bench/results/presets_speed_one_image*.json
        # the model's presets in one run; each preset's "certified" in its cascade.json is written from it, with
        # the one-image speeds of bench/preset_speed.py's reports (eager, and --fast)

Each setting is a dict of generate() options; "default" is the model's own. The table printed (Markdown) and the
SVG plot (adherence against seconds per image, the Pareto front joined) go into bench/RESULTS.md and docs/.
Seconds per image are per image in batches of 8 captions on this machine, so read them as ratios to "default".
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import engine  # noqa: E402
from engine.demo.evaluate import EvalOptions, evaluate  # noqa: E402

# Stage I of the packaged model guides at 7 with smart27 DDPM steps; stage II runs 15 steps unguided.
SETTINGS: dict[str, dict] = {
    "default": {},
    "smart50": {"steps": ("smart50", 15)},
    "fast27": {"steps": ("fast27", 15)},
    "ddim 20/10": {"scheduler": "ddim", "steps": (20, 10)},
    "ddim 10/6": {"scheduler": "ddim", "steps": (10, 6)},
    "dpm++ 20/10": {"scheduler": "dpm++2m", "steps": (20, 10)},
    "dpm++ 15/8": {"scheduler": "dpm++2m", "steps": (15, 8)},
    "dpm++ 10/6": {"scheduler": "dpm++2m", "steps": (10, 6)},
    "dpm++ 8/5": {"scheduler": "dpm++2m", "steps": (8, 5)},
    "dpm++ 8/4": {"scheduler": "dpm++2m", "steps": (8, 4)},
    "dpm++ 10/6 g4": {"scheduler": "dpm++2m", "steps": (10, 6), "guidance": (4.0, 1.0)},
    "dpm++ 10/6 g10": {"scheduler": "dpm++2m", "steps": (10, 6), "guidance": (10.0, 1.0)},
    "smart27 interval 0:700": {"guidance_interval": ((0, 700), None)},
    "smart27 interval 200:1000": {"guidance_interval": ((200, 1000), None)},
    "smart27 interval 400:1000": {"guidance_interval": ((400, 1000), None)},
    "dpm++ 10/6 interval 0:700": {"scheduler": "dpm++2m", "steps": (10, 6), "guidance_interval": ((0, 700), None)},
    "dpm++ 10/6 interval 300:1000": {"scheduler": "dpm++2m", "steps": (10, 6),
                                     "guidance_interval": ((300, 1000), None)},
    "dpm++ 8/5 interval 300:1000": {"scheduler": "dpm++2m", "steps": (8, 5), "guidance_interval": ((300, 1000), None)},
    "dpm++ 8/4 interval 500:1000": {"scheduler": "dpm++2m", "steps": (8, 4), "guidance_interval": ((500, 1000), None)},
    "no guidance, dpm++ 10/6": {"scheduler": "dpm++2m", "steps": (10, 6), "guidance": 1.0},
    # Per-stage samplers (what a preset can say): stage II, unguided at 128 px, is most of the time.
    "smart27 interval 200:1000 + II dpm++ 8": {"stages": [{"guidance_interval": [200, 1000]},
                                                         {"scheduler": "dpm++2m", "steps": 8}]},
    "smart27 interval 200:1000 + II dpm++ 6": {"stages": [{"guidance_interval": [200, 1000]},
                                                         {"scheduler": "dpm++2m", "steps": 6}]},
    "smart27 interval 200:1000 + II dpm++ 4": {"stages": [{"guidance_interval": [200, 1000]},
                                                         {"scheduler": "dpm++2m", "steps": 4}]},
    "smart27 interval 200:1000 + II dpm++ 3": {"stages": [{"guidance_interval": [200, 1000]},
                                                         {"scheduler": "dpm++2m", "steps": 3}]},
    "smart27 interval 200:1000 + II ddim 8": {"stages": [{"guidance_interval": [200, 1000]},
                                                        {"scheduler": "ddim", "steps": 8}]},
    "smart27 interval 200:1000 + II ddim 5": {"stages": [{"guidance_interval": [200, 1000]},
                                                        {"scheduler": "ddim", "steps": 5}]},
    "smart27 interval 200:1000 + II ddpm 8": {"stages": [{"guidance_interval": [200, 1000]}, {"steps": 8}]},
    "smart27 interval 200:1000 + II ddpm 6": {"stages": [{"guidance_interval": [200, 1000]}, {"steps": 6}]},
    "smart27 interval 200:1000 + II ddpm 5": {"stages": [{"guidance_interval": [200, 1000]}, {"steps": 5}]},
    "ddpm 20 interval 200:1000 + II ddpm 6": {"stages": [{"steps": 20, "guidance_interval": [200, 1000]},
                                                        {"steps": 6}]},
    "smart27 interval 200:700 + II ddpm 6": {"stages": [{"guidance_interval": [200, 700]}, {"steps": 6}]},
    "smart27 interval 100:800 + II ddpm 6": {"stages": [{"guidance_interval": [100, 800]}, {"steps": 6}]},
    "smart27 interval 200:700 + II ddpm 5": {"stages": [{"guidance_interval": [200, 700]}, {"steps": 5}]},
    "smart27 interval 250:650 + II ddpm 6": {"stages": [{"guidance_interval": [250, 650]}, {"steps": 6}]},
    # Stage II from pure noise: DDPM's "leading" spacing starts 6 steps at t=830, 5 at t=800; explicit lists start
    # at t=999 ("trailing" spacing) and end where the last step lands.
    "smart27 interval 200:700 + II t6 999..166": {"stages": [{"guidance_interval": [200, 700]},
                                                           {"steps": [999, 833, 666, 500, 333, 166]}]},
    "smart27 interval 200:700 + II t5 999..199": {"stages": [{"guidance_interval": [200, 700]},
                                                           {"steps": [999, 799, 599, 399, 199]}]},
    "smart27 interval 200:700 + II t5 999..0": {"stages": [{"guidance_interval": [200, 700]},
                                                         {"steps": [999, 700, 400, 150, 0]}]},
    "smart27 interval 200:700 + II t4 999..249": {"stages": [{"guidance_interval": [200, 700]},
                                                           {"steps": [999, 749, 499, 249]}]},
    "smart27 interval 200:700 + II t4 999..0": {"stages": [{"guidance_interval": [200, 700]},
                                                         {"steps": [999, 600, 250, 0]}]},
    "smart27 interval 200:700 + II t4 999,700,350,0": {"stages": [{"guidance_interval": [200, 700]},
                                                                {"steps": [999, 700, 350, 0]}]},
    "smart27 interval 250:650 + II t4 999..0": {"stages": [{"guidance_interval": [250, 650]},
                                                         {"steps": [999, 600, 250, 0]}]},
    "smart27 interval 200:700 + II t3 999..0": {"stages": [{"guidance_interval": [200, 700]},
                                                         {"steps": [999, 500, 0]}]},
    "smart27 interval 200:700 + II t3 999..150": {"stages": [{"guidance_interval": [200, 700]},
                                                           {"steps": [999, 550, 150]}]},
    "smart27 + II dpm++ 6": {"stages": [None, {"scheduler": "dpm++2m", "steps": 6}]},
    "smart27 interval 400:1000 + II dpm++ 6": {"stages": [{"guidance_interval": [400, 1000]},
                                                         {"scheduler": "dpm++2m", "steps": 6}]},
    "dpm++ 15 interval 300:1000 + II dpm++ 6": {"stages": [{"scheduler": "dpm++2m", "steps": 15,
                                                           "guidance_interval": [300, 1000]},
                                                          {"scheduler": "dpm++2m", "steps": 6}]},
}


# Feature caching (cache=, the feature-caching issue) on top of the `fast` preset's settings: candidates for a
# certified `turbo` (bench/RESULTS.md, "Feature caching in the engine"). `fast` is stage I guided at
# 200 <= t < 700 and stage II on five explicit timesteps; "cache I 8/3" is stage I's cache {"interval": 8,
# "full_first": 3}, "II 2" stage II's cache=2.
FAST_I, FAST_II = {"guidance_interval": [200, 700]}, {"steps": [999, 700, 400, 150, 0]}
CANDIDATES: dict[str, dict] = {
    "fast + cache I 4/3": {"stages": [{**FAST_I, "cache": {"interval": 4, "full_first": 3}}, FAST_II]},
    "fast + cache I 4/3, II 2": {"stages": [{**FAST_I, "cache": {"interval": 4, "full_first": 3}},
                                            {**FAST_II, "cache": 2}]},
    "fast + cache I 6/3, II 3": {"stages": [{**FAST_I, "cache": {"interval": 6, "full_first": 3}},
                                            {**FAST_II, "cache": 3}]},
    "fast + cache I 8/2, II 5": {"stages": [{**FAST_I, "cache": {"interval": 8, "full_first": 2}},
                                            {**FAST_II, "cache": 5}]},
    "fast + cache I 4/3, II 4/3": {"stages": [{**FAST_I, "cache": {"interval": 4, "full_first": 3}},
                                              {**FAST_II, "cache": {"interval": 4, "full_first": 3}}]},
    "fast + cache I 8/3, II 4/3": {"stages": [{**FAST_I, "cache": {"interval": 8, "full_first": 3}},
                                              {**FAST_II, "cache": {"interval": 4, "full_first": 3}}]},
    "fast + cache I 12/3, II 4/3": {"stages": [{**FAST_I, "cache": {"interval": 12, "full_first": 3}},
                                               {**FAST_II, "cache": {"interval": 4, "full_first": 3}}]},
    "I 20 + cache 6/3, II fast + cache 4/3": {"stages": [
        {**FAST_I, "steps": 20, "cache": {"interval": 6, "full_first": 3}},
        {**FAST_II, "cache": {"interval": 4, "full_first": 3}}]},
    "I 16 + cache 6/3, II fast + cache 4/3": {"stages": [
        {**FAST_I, "steps": 16, "cache": {"interval": 6, "full_first": 3}},
        {**FAST_II, "cache": {"interval": 4, "full_first": 3}}]},
    "fast + cache I 8/3, II t3 999..150": {"stages": [{**FAST_I, "cache": {"interval": 8, "full_first": 3}},
                                                      {"steps": [999, 550, 150]}]},
    "fast + cache I 12/3, II t3 999..150": {"stages": [{**FAST_I, "cache": {"interval": 12, "full_first": 3}},
                                                       {"steps": [999, 550, 150]}]},
    "fast + cache I 10/3, II t3 999..150": {"stages": [{**FAST_I, "cache": {"interval": 10, "full_first": 3}},
                                                       {"steps": [999, 550, 150]}]},
    "fast + cache I 8/2, II t3 999..150": {"stages": [{**FAST_I, "cache": {"interval": 8, "full_first": 2}},
                                                      {"steps": [999, 550, 150]}]},
    "fast + cache I 8/2, II t3 999..150 + cache [0, 2]": {"stages": [
        {**FAST_I, "cache": {"interval": 8, "full_first": 2}}, {"steps": [999, 550, 150], "cache": {"refresh": [0, 2]}}]},
    "fast + cache I 8/2, II t3 999..150 + cache 3": {"stages": [
        {**FAST_I, "cache": {"interval": 8, "full_first": 2}}, {"steps": [999, 550, 150], "cache": 3}]},
    "fast + cache I 8/2, II t2 999, 450": {"stages": [{**FAST_I, "cache": {"interval": 8, "full_first": 2}},
                                                      {"steps": [999, 450]}]},
    "fast + cache I 8/2": {"stages": [{**FAST_I, "cache": {"interval": 8, "full_first": 2}}, FAST_II]},
    "balanced + cache I 4/2": {"stages": [{"guidance_interval": [200, 1000], "cache": {"interval": 4, "full_first": 2}},
                                          {"steps": 8}]},
    "fast + cache I 8/2, II t2 999, 300": {"stages": [{**FAST_I, "cache": {"interval": 8, "full_first": 2}},
                                                      {"steps": [999, 300]}]},
    "fast + cache I 8/2, II t2 999, 600": {"stages": [{**FAST_I, "cache": {"interval": 8, "full_first": 2}},
                                                      {"steps": [999, 600]}]},
    "fast + cache I 8/3, II t2 999, 450": {"stages": [{**FAST_I, "cache": {"interval": 8, "full_first": 3}},
                                                      {"steps": [999, 450]}]},
    "fast + cache I 6/3, II t2 999, 450": {"stages": [{**FAST_I, "cache": {"interval": 6, "full_first": 3}},
                                                      {"steps": [999, 450]}]},
    "fast + cache I 8/2, II t4 999..150 + cache [0, 2]": {"stages": [
        {**FAST_I, "cache": {"interval": 8, "full_first": 2}},
        {"steps": [999, 700, 400, 150], "cache": {"refresh": [0, 2]}}]},
    "I 16 + cache 3/2, II fast + cache 3": {"stages": [
        {**FAST_I, "steps": 16, "cache": {"interval": 3, "full_first": 2}}, {**FAST_II, "cache": 3}]},
}
SETTINGS.update(CANDIDATES)


def as_options(pipe, name: str, setting: dict) -> dict:
    """generate() options for a setting; per-stage settings ("stages") become a preset of the pipeline."""
    if "stages" not in setting:
        return setting
    pipe.add_preset(name, setting["stages"])
    return {"preset": name}


def pareto(rows: list[dict]) -> set[str]:
    """Names of the settings no other beats on both adherence (higher) and seconds per image (lower)."""
    front = set()
    for row in rows:
        beaten = any(o["adherence"] >= row["adherence"] and o["seconds_per_image"] < row["seconds_per_image"]
                     and (o["adherence"] > row["adherence"] or o["seconds_per_image"] < row["seconds_per_image"])
                     for o in rows if o is not row)
        if not beaten:
            front.add(row["name"])
    return front


def svg(rows: list[dict], front: set[str], title: str) -> str:
    """Adherence against seconds per image, one labelled point per setting, the Pareto front joined."""
    width, height, margin = 760, 460, 60
    xs = [r["seconds_per_image"] for r in rows]
    x_max = max(xs) * 1.1
    y_min = min(0.5, min(r["adherence"] for r in rows) - 0.05)

    def at(row):
        x = margin + row["seconds_per_image"] / x_max * (width - 2 * margin)
        y = height - margin - (row["adherence"] - y_min) / (1 - y_min) * (height - 2 * margin)
        return x, y

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="13">{title}</text>',
           f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="black"/>',
           f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>',
           f'<text x="{width / 2}" y="{height - 20}" text-anchor="middle">seconds per image (CPU)</text>',
           f'<text x="15" y="{height / 2}" transform="rotate(-90 15 {height / 2})" text-anchor="middle">'
           'prompt adherence</text>']
    for k in range(6):
        value = y_min + (1 - y_min) * k / 5
        y = height - margin - k / 5 * (height - 2 * margin)
        out.append(f'<text x="{margin - 6}" y="{y + 4}" text-anchor="end">{value:.0%}</text>')
        seconds = x_max * k / 5
        x = margin + k / 5 * (width - 2 * margin)
        out.append(f'<text x="{x}" y="{height - margin + 16}" text-anchor="middle">{seconds:.2f}</text>')
    on_front = sorted((r for r in rows if r["name"] in front), key=lambda r: r["seconds_per_image"])
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in map(at, on_front))
    out.append(f'<polyline points="{points}" fill="none" stroke="#c33" stroke-width="1.5"/>')
    for row in rows:
        x, y = at(row)
        colour = "#c33" if row["name"] in front else "#36c"
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
        out.append(f'<text x="{x + 6:.1f}" y="{y - 5:.1f}" fill="{colour}">{row["name"]}</text>')
    out.append("</svg>")
    return "\n".join(out)


def table(rows: list[dict], front: set[str]) -> str:
    base = next((r for r in rows if r["name"] == "default"), rows[0])
    lines = ["| setting | adherence | shape | colour | background | size | position | Fréchet | s/image | "
             "speed vs default |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["seconds_per_image"]):
        a = r["aspects"]
        name = f"**{r['name']}**" if r["name"] in front else r["name"]
        lines.append(f"| {name} | {r['adherence']:.1%} | {a['shape']:.0%} | {a['colour']:.0%} | "
                     f"{a['background']:.0%} | {a['size']:.0%} | {a['position']:.0%} | {r['frechet_distance']:.4f} | "
                     f"{r['seconds_per_image']:.3f} | {base['seconds_per_image'] / r['seconds_per_image']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=64, help="held-out captions per setting")
    parser.add_argument("--only", nargs="+", default=None, help="these settings (or preset names) only")
    parser.add_argument("--presets", action="store_true", help="sweep the model's own presets instead")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--svg", type=Path, default=None)
    parser.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                        help="no runs: the table and plot of earlier runs' JSON (a later row of a name wins)")
    parser.add_argument("--exclude", nargs="+", default=(), help="with --merge: rows left out of the plot")
    parser.add_argument("--certify", nargs="*", type=Path, default=None, metavar="SPEED_JSON",
                        help="with --presets: write each preset's certificate into the packaged model's cascade.json, "
                             "with the one-image speeds of these bench/preset_speed.py reports")
    args = parser.parse_args()
    if args.certify is not None and not args.presets:
        parser.error("--certify certifies the model's presets: add --presets")
    if args.merge:
        # This machine's speed drifts between runs (the defaults took 0.33-0.47 s/image on one day): each run's
        # seconds are scaled by the last run's defaults over its own (a run without the defaults takes the scale
        # of the run before it), so that speeds compare across runs.
        runs = [json.loads(path.read_text())["rows"] for path in args.merge]
        defaults = [next((r["seconds_per_image"] for r in rows if r["name"] == "default"), None) for rows in runs]
        reference = next((d for d in reversed(defaults) if d), None)
        merged, scale = {}, 1.0
        for rows, base in zip(runs, defaults):
            scale = reference / base if base else scale
            merged.update({row["name"]: {**row, "seconds_per_image": row["seconds_per_image"] * scale} for row in rows})
        rows = [row for name, row in merged.items() if name not in args.exclude]
        front = pareto(rows)
        print(table(rows, front))
        if args.svg is not None:
            args.svg.write_text(svg(rows, front, f"shapes: quality gate ({rows[0]['count']} held-out captions) "
                                                 "against CPU seconds per image"))
        return

    torch.set_num_threads(torch.get_num_threads())
    pipe = engine.load(engine.DEFAULT_MODEL, device="cpu")
    settings = dict(SETTINGS)
    if args.presets:
        settings = {"default": {}, **{name: {"preset": name} for name in pipe.presets}}
    if args.only:
        settings = {name: settings[name] for name in args.only}
    rows = []
    for name, setting in settings.items():
        options = as_options(pipe, name, setting)
        evaluate(pipe, EvalOptions(count=8), **options)  # warm-up: first-call costs out of the timing
        report = evaluate(pipe, EvalOptions(count=args.count), **options)
        rows.append({"name": name, **report})
        print(f"{name}: {report['adherence']:.1%}, {report['seconds_per_image']:.3f} s/image", file=sys.stderr)
    front = pareto(rows)
    print(table(rows, front))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "count": args.count,
            "command": " ".join(sys.argv)}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**meta, "pareto": sorted(front), "rows": rows}, indent=2, default=str) + "\n")
    if args.svg is not None:
        args.svg.parent.mkdir(parents=True, exist_ok=True)
        args.svg.write_text(svg(rows, front, f"shapes: quality gate ({args.count} held-out captions) "
                                             "against CPU seconds per image"))
    if args.certify is not None:
        certify(rows, args.certify, meta)


def certify(rows: list[dict], speed_reports: list[Path], meta: dict, margin: float = 0.02) -> None:
    """Write each preset's certificate into the packaged model's cascade.json: this run's adherence and seconds per
    image (batches of 8) beside the defaults', and the one-image speed of each speed report ("one_image_speedup",
    "one_image_speedup_fast_path" for a --fast report). Refuses a preset outside the margin of the defaults."""
    from engine.model_dir import PACKAGED_ROOT

    path = PACKAGED_ROOT / engine.DEFAULT_MODEL / "cascade.json"
    cascade = json.loads(path.read_text())
    by_name = {row["name"]: row for row in rows}
    base = by_name["default"]
    speeds = [json.loads(report.read_text()) for report in speed_reports]
    for name, preset in cascade["presets"].items():
        row = by_name[name]
        if row["adherence"] < base["adherence"] - margin:
            raise SystemExit(f"{name}: {row['adherence']:.1%} is more than {margin:.0%} below the defaults' "
                             f"{base['adherence']:.1%}: not certified")
        certified = {"adherence": round(row["adherence"], 4), "default_adherence": round(base["adherence"], 4),
                     "captions": row["count"], "seconds_per_image": round(row["seconds_per_image"], 3),
                     "default_seconds_per_image": round(base["seconds_per_image"], 3),
                     "speedup": round(base["seconds_per_image"] / row["seconds_per_image"], 2)}
        for report in speeds:
            found = {r["name"]: r["speedup"] for r in report["rows"]}
            if name in found:
                key = "one_image_speedup_fast_path" if report.get("fast") else "one_image_speedup"
                certified[key] = round(found[name], 2)
        sources = " and ".join(_as_typed(report["command"]) for report in speeds)
        certified |= {"floor": preset.get("certified", {}).get("floor", 0.85),
                      "measured": f"{meta['date']}, {meta['threads']}-thread CPU, in one run: {_as_typed(meta['command'])}"
                                  + (f"; one-image speed: {sources}" if sources else "")}
        preset["certified"] = certified
    path.write_text(json.dumps(cascade, indent=2) + "\n")
    print(f"certificates written to {path}", file=sys.stderr)


def _as_typed(command: str) -> str:
    """A recorded command line as typed from the repository's root: no absolute paths into it, the script's folder."""
    command = command.replace(str(Path(__file__).resolve().parents[1]) + "/", "")
    script = command.split(" ", 1)[0]
    return f"python bench/{command}" if script.endswith(".py") and "/" not in script else command


if __name__ == "__main__":
    main()
