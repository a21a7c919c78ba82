"""The auto search's report: every attempt as a Markdown table and a Pareto plot (validation accuracy against flash).

Takes the search's `report.json` document (a dict: budgets, the float model's accuracy, `attempts`, `chosen` or
`closest`); returns Markdown text and PNG bytes. Reads nothing else, so a report can be redrawn from the JSON.
"""

from __future__ import annotations

import io


def _fmt(value, spec: str = ",", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def render_markdown(document: dict) -> str:
    budgets = document.get("budgets") or {}
    lines = [f"# tfcompress auto: {document['source']}", "",
             f"Gates: accuracy drop ≤ {document['max_accuracy_drop']} against the float model (validation "
             f"{document['float_validation_accuracy']:.4f} on {document['validation_samples']:,} samples)"
             + "".join(f", {name} ≤ {value:,}" for name, value in budgets.items()) + "."
             + (" The search was cut by --max_minutes." if document.get("cut") else ""), ""]
    chosen = document.get("chosen")
    if chosen:
        test = ""
        if chosen.get("test_accuracy") is not None:
            test = (f"; test accuracy {chosen['test_accuracy']:.4f} (float {chosen['float_test_accuracy']:.4f}, "
                    f"{chosen['test_samples']:,} test samples, measured once, after the search)")
        lines += [f"Chosen: **{chosen['name']}** (attempt {chosen['index']}): flash {chosen['flash_bytes']:,} bytes, "
                  f"validation accuracy {chosen['validation_accuracy']:.4f}{test}.", ""]
    elif document.get("closest"):
        closest = document["closest"]
        lines += [f"No attempt met every gate. Closest: **{closest['name']}** ({closest['verdict']}), kept in "
                  f"`{closest['directory']}`.", ""]
    debugged = document.get("debugger")
    if debugged and debugged.get("worst_layers"):
        worst = ", ".join(f"`{layer['tensor']}` ({layer['op']}, SQNR {_fmt(layer['sqnr_db'], '.1f')} dB)"
                          for layer in debugged["worst_layers"])
        lines += [f"Post-training quantization lost accuracy; the quantization debugger's worst layers on "
                  f"{debugged['samples']} calibration samples: {worst}. Other calibration draws come next, then "
                  "QAT.", ""]
    elif debugged:
        lines += [f"Post-training quantization lost accuracy; the quantization debugger failed: {debugged['error']}",
                  ""]
    lines += ["| # | attempt | settings | validation accuracy | drop (points) | flash bytes | gzip bytes | arena bytes "
              "| latency (ms) | seconds | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in document["attempts"]:
        settings = ", ".join(f"{k}={v}" for k, v in a["settings"].items()) + (", LUT compression" if a["compress"]
                                                                              else "")
        drop = None if a.get("accuracy_drop") is None else a["accuracy_drop"] * 100
        lines.append(f"| {a['index']} | {a['name']} | {settings} | {_fmt(a.get('validation_accuracy'), '.4f')} | "
                     f"{_fmt(drop, '+.2f')} | {_fmt(a.get('flash_bytes'))} | {_fmt(a.get('gzip_bytes'))} | "
                     f"{_fmt(a.get('arena_bytes'))} | {_fmt(a.get('latency_median_ms'), '.3f')} | {a['seconds']} | "
                     f"{a['verdict']} |")
    lines += ["", "![validation accuracy against flash](pareto.png)"]
    return "\n".join(lines) + "\n"


def render_pareto(document: dict) -> bytes:
    """Validation accuracy against flash bytes, one point per attempt, the budget lines drawn."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [a for a in document["attempts"] if a.get("flash_bytes") is not None]
    for a in done:
        color = "tab:green" if not a["misses"] else "tab:red"
        ax.scatter(a["flash_bytes"], a["validation_accuracy"], color=color, zorder=3)
        ax.annotate(f"{a['index']} {a['name']}", (a["flash_bytes"], a["validation_accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    floor = document["float_validation_accuracy"] - document["max_accuracy_drop"]
    ax.axhline(floor, color="gray", linestyle="--", label=f"accuracy floor {floor:.4f}")
    flash = (document.get("budgets") or {}).get("flash_bytes")
    if flash is not None:
        ax.axvline(flash, color="gray", linestyle=":", label=f"flash budget {flash:,} B")
    ax.set_xscale("log")
    ax.set_xlabel("flash bytes (log)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("auto: every attempt (green meets every gate)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
