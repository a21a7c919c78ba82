"""What the benchmark scripts share: target records, failed-path records, directory names."""

from __future__ import annotations


def target(value: float, goal: float, at_most: bool, why: str) -> dict:
    """A target's record: measured `value` against `goal` (an upper bound when `at_most`); `why` if missed."""
    passed = value <= goal if at_most else value >= goal
    return {"measured": value, "target": goal, "at_most": at_most, "passed": passed,
            "why": None if passed else why}


def failed_paths(rows: dict) -> dict:
    """One missed "<path> runs" target per row that ended in an error (a failed path is a result)."""
    return {f"{name} runs": {"measured": None, "target": None, "at_most": None, "passed": False,
                             "why": row["error"]}
            for name, row in rows.items() if "error" in row}


def slug(name: str) -> str:
    """A directory name for a path's label."""
    return "".join(c if c.isalnum() else "_" for c in name.replace("%", "pct")).strip("_").lower()


def finish_tables(lines: list[str], targets: dict, total_seconds: float) -> str:
    """Appends the targets table (and why each miss happened) and the run time to `lines`; joins them."""
    lines = [*lines, "", "| target | measured | target | result |", "|---|---|---|---|"]
    whys = []
    for name, t in targets.items():
        measured = "—" if t["measured"] is None else f"{t['measured']:.3f}"
        goal = "—" if t["target"] is None else f"{'≤' if t['at_most'] else '≥'} {t['target']:g}"
        lines.append(f"| {name} | {measured} | {goal} | {'PASS' if t['passed'] else 'MISS'} |")
        if not t["passed"]:
            whys.append(f"- MISS {name}: {t['why']}")
    lines += ["", *whys, "" if whys else "", f"Total run {total_seconds:.1f} s."]
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1]))
