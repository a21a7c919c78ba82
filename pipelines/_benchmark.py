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
