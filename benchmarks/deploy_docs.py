"""Markdown tables of a bench_deploy run, written into docs/deploy.md between per-group markers.

Each group lives between ``<!-- bench_deploy:<device>:<group> -->`` and ``<!-- /bench_deploy:<device>:<group> -->``,
inside the report section ``<!-- bench_deploy -->`` ... ``<!-- /bench_deploy -->``; a new run replaces only
the groups it measured (others keep their earlier tables, each with its own machine line).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SECTION = ("<!-- bench_deploy -->", "<!-- /bench_deploy -->")
HEADING = "## Measured: the deployment report (`benchmarks/bench_deploy.py`)"


def machine_line(run: dict[str, Any]) -> str:
    """CPU, the instruction sets that matter, threads, versions, load average before/after, date, commit."""
    m = run["machine"]
    flags = run.get("cpu_flags", {})
    has = [f for f, on in flags.items() if on] or ["none of them"]
    lacks = [f for f, on in flags.items() if not on]
    loads = list((m.get("loadavg_start") or ())[:1]) + list((m.get("loadavg_end") or ())[:1])
    load = "/".join(f"{v:.1f}" for v in loads)
    # Only a run that started and ended below 1.5 counts as idle (docs: a loaded machine gives nonsense).
    shared = "idle apart from the run" if loads and max(loads) < 1.5 else "other jobs shared the machine"
    args = run["args"]
    return (
        f"{m['cpu']} ({m['cpu_count']} cores; reports {', '.join(has)}; lacks {', '.join(lacks) or 'nothing'}), "
        f"{args['threads']} thread(s), {args['device']}, torch {m['torch']}, "
        f"{', '.join(f'{k} {v}' for k, v in run.get('versions', {}).items() if k != 'timm')}, "
        f"{args['rounds']} interleaved rounds, "
        f"load average {load} (1 min, start/end; {shared}), {m['time']}, commit {m['git_commit']}"
    )


def _accuracy(acc: dict[str, float], ref: dict[str, float]) -> str:
    if not acc:
        return "(peer, random weights)"
    if "top1_agreement" in acc:
        return f"{acc['top1_agreement']:.3f} / {acc['top5_hit']:.3f} (cos {acc['cosine']:.4f})"
    parts = []
    for key, label in (("mIoU", "mIoU"), ("AP", "AP")):
        if key in acc:
            delta = f" ({acc[key] - ref[key]:+.3f})" if key in ref else ""
            parts.append(f"{label} {acc[key]:.3f}{delta}")
    if "pixel_agreement" in acc:
        parts.append(f"pixels {acc['pixel_agreement']:.4f}")
    if "output_cosine" in acc:
        parts.append(f"cos {acc['output_cosine']:.4f}")
    return ", ".join(parts)


def group_table(group: dict[str, Any]) -> str:
    """The markdown table of one group."""
    rows = group["rows"]
    ref = next((r["accuracy"] for r in rows if r["name"].startswith("ours eager")), {})
    lines = [
        f"**{group['title']}**. Accuracy: {group['accuracy_note']}.",
        "",
        "| row | ms / batch | speed-up vs reference (IQR) | vs our eager fp32 | MB | accuracy vs fp32 | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs_eager = f"{r['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in r else ""
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") is not None else ""
        lines.append(
            f"| {r['name']} | {r['median_s'] * 1e3:.0f} | {r['speedup_vs_ref']:.2f} "
            f"({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}) | {vs_eager} | {size} | "
            f"{_accuracy(r['accuracy'], ref)} | {r.get('note', '')} |"
        )
    for f in group.get("failed", []):
        lines.append(f"| {f['name']} | | | | | | not measured: {f['error']} |")
    return "\n".join(lines)


def render(run: dict[str, Any]) -> dict[str, str]:
    """``{marker key: markdown block}`` for every group of a run (its JSON: machine, args, groups)."""
    device = run["args"]["device"]
    line = machine_line(run)
    return {f"{device}:{name}": f"{group_table(g)}\n\n<sub>{line}</sub>" for name, g in run["groups"].items()}


def write(path: Path, run: dict[str, Any]) -> None:
    """Replace (or add) each measured group's block in ``path``."""
    text = path.read_text()
    if SECTION[0] not in text:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n\n{SECTION[0]}\n{SECTION[1]}\n"
    blocks = render(run)
    for key, block in blocks.items():
        start, end = f"<!-- bench_deploy:{key} -->", f"<!-- /bench_deploy:{key} -->"
        new = f"{start}\n{block}\n{end}"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _, new=new: new, text)
        else:
            text = text.replace(SECTION[1], f"{new}\n\n{SECTION[1]}")
    path.write_text(text)
    print(f"wrote {', '.join(blocks)} into {path}")


def main() -> None:
    """``python3 benchmarks/deploy_docs.py RUN.json [...] [--write]``: print (or write into the docs) the tables."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by bench_deploy.py")
    parser.add_argument("--write", action="store_true", help="also write them into docs/deploy.md")
    args = parser.parse_args()
    for path in args.runs:
        run = json.loads(path.read_text())
        for key, block in render(run).items():
            print(f"\n<!-- {key} -->\n{block}")
        if args.write:
            write(Path(__file__).resolve().parents[1] / "docs" / "deploy.md", run)


__all__ = ["group_table", "machine_line", "main", "render", "write"]


if __name__ == "__main__":
    main()
