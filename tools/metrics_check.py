"""Metrics regression gate: compare the workspace's metrics with those committed at a git revision.

Like ``dvc metrics diff``, it reads the committed files with ``git show REV:PATH``. Each
metric is named ``<file stem>.<key path>`` (``moons.by_solver.rk4.nfe16.w2``) and gets a
direction and a relative tolerance from the first matching rule of
metrics_tolerances.yaml. The check fails (exit code 1) and prints a table of every
metric that got worse beyond its tolerance. A metric that was finite at the revision and
is NaN or infinite in the workspace counts as worse, unless its rule's direction is
``ignore``. Removed metrics (at the revision, missing from the workspace, whole files
included) also fail the check, because a stage that stops writing a metric is a
regression. Pass ``--allow-removed`` when a removal is intended. New metrics, and changed
values that are not numbers, are listed but do not fail it. Timing files
(reports/timing/) are never compared, because wall-clock times vary between identical
runs.

Usage (from the repository root):
``python tools/metrics_check.py [--rev HEAD] [--allow-removed]``.
Exit codes: 0 passed, 1 a metric got worse or was removed, 2 invalid input (tolerance
file, a metrics file that is not UTF-8 JSON, an unknown revision, a git failure). A
repository with no commits at all passes, because there is nothing to compare against.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

DIRECTIONS = ("lower", "higher", "either", "ignore")
EXCLUDED_PREFIXES = ("reports/timing/",)


class CheckError(Exception):
    """Invalid input: the tolerance file, a metrics file or the git revision."""


class NoCommitsError(Exception):
    """The repository has no commits at all, so there is no baseline to compare against."""


@dataclass(frozen=True)
class Rule:
    """Direction of improvement and allowed change for the metrics whose names match ``pattern``."""

    pattern: str
    direction: str
    tolerance: float
    abs_tolerance: float


@dataclass(frozen=True)
class Change:
    name: str
    path: str
    old: object
    new: object
    rule: Rule

    @property
    def relative(self) -> float | None:
        if not _is_number(self.old) or not _is_number(self.new):
            return None
        if self.old == 0:
            return math.inf if self.new != 0 else 0.0
        return (self.new - self.old) / abs(self.old)


# ---------------------------------------------------------------- tolerances


def load_rules(path: Path) -> list[Rule]:
    """Read the tolerance file and return its rules followed by the default (pattern ``*``)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckError(f"{path}: cannot read the tolerance file ({error.strerror})") from error
    except yaml.YAMLError as error:
        raise CheckError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from error
    if not isinstance(raw, dict) or "default" not in raw:
        raise CheckError(f"{path}: expected a mapping with the keys 'default' and 'rules'")
    unknown = set(raw) - {"default", "rules"}
    if unknown:
        raise CheckError(f"{path}: unknown keys {sorted(unknown)}; accepted: default, rules")

    default = _parse_rule(raw["default"], "default", None)
    rules = [_parse_rule(entry, f"rules[{i}]", default) for i, entry in enumerate(raw.get("rules") or [])]
    return rules + [default]


def _parse_rule(entry: object, where: str, default: Rule | None) -> Rule:
    if not isinstance(entry, dict):
        raise CheckError(f"metrics_tolerances.yaml: {where} must be a mapping, got {entry!r}")
    known = {"pattern", "direction", "tolerance", "abs_tolerance"}
    if set(entry) - known:
        raise CheckError(f"metrics_tolerances.yaml: {where} has unknown keys {sorted(set(entry) - known)}; accepted: {', '.join(sorted(known))}")

    pattern = entry.get("pattern", "*" if default is None else None)
    if not isinstance(pattern, str) or not pattern:
        raise CheckError(f"metrics_tolerances.yaml: {where}.pattern must be a non-empty glob, got {pattern!r}")
    direction = entry.get("direction", default.direction if default else None)
    if direction not in DIRECTIONS:
        raise CheckError(f"metrics_tolerances.yaml: {where}.direction is {direction!r}; accepted: {', '.join(DIRECTIONS)}")
    tolerance = _non_negative(entry.get("tolerance", default.tolerance if default else None), f"{where}.tolerance")
    abs_tolerance = _non_negative(entry.get("abs_tolerance", default.abs_tolerance if default else 0.0), f"{where}.abs_tolerance")
    return Rule(pattern, direction, tolerance, abs_tolerance)


def _non_negative(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CheckError(f"metrics_tolerances.yaml: {where} is {value!r}; accepted: a finite number >= 0")
    return float(value)


def rule_for(name: str, rules: list[Rule]) -> Rule:
    """Return the first rule whose glob matches the flattened metric name (the default matches all)."""
    return next(rule for rule in rules if fnmatch.fnmatchcase(name, rule.pattern))


# ---------------------------------------------------------------- reading metrics


def flatten(value: object, prefix: str) -> dict[str, object]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, object] = {}
    for key, item in value.items():
        flat.update(flatten(item, f"{prefix}.{key}"))
    return flat


def parse_metrics(content: bytes, source: str) -> dict:
    """Decode ``content`` as UTF-8 JSON (RFC 8259 requires UTF-8) and return its top-level object."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CheckError(f"{source}: not valid UTF-8 (byte 0x{content[error.start]:02x} at offset {error.start})") from error
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckError(f"{source}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise CheckError(f"{source}: expected a JSON object of metrics, found {type(data).__name__}")
    return data


def is_included(path: str, pattern: str) -> bool:
    return PurePosixPath(path).match(pattern) and not path.startswith(EXCLUDED_PREFIXES)


def workspace_metrics(root: Path, pattern: str) -> dict[str, tuple[str, object]]:
    """Return ``{metric name: (file path, value)}`` for the metrics files in the working tree."""
    metrics: dict[str, tuple[str, object]] = {}
    for path in sorted(root.glob(pattern)):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and is_included(relative, pattern):
            try:
                content = path.read_bytes()
            except OSError as error:
                raise CheckError(f"{relative}: cannot read the metrics file ({error.strerror})") from error
            data = parse_metrics(content, relative)
            metrics.update({name: (relative, value) for name, value in flatten(data, path.stem).items()})
    return metrics


def git_bytes(root: Path, *args: str) -> bytes:
    """Run git in ``root`` and return its raw stdout, so that file contents are decoded by the caller."""
    result = subprocess.run(["git", *args], cwd=root, capture_output=True)
    if result.returncode != 0:
        stderr = " ".join(result.stderr.decode("utf-8", errors="replace").split())
        raise CheckError(f"git {' '.join(args)} failed: {stderr}")
    return result.stdout


def git(root: Path, *args: str) -> str:
    return git_bytes(root, *args).decode("utf-8", errors="surrogateescape")


def resolve_commit(root: Path, rev: str) -> str:
    """Return the commit id of ``rev``.

    Raises NoCommitsError in a repository without any commit, and CheckError when ``rev``
    names no commit or ``root`` is not in a git repository.
    """
    resolved = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"], cwd=root, capture_output=True, text=True)
    if resolved.returncode == 0:
        return resolved.stdout.strip()
    # Both calls raise CheckError outside a git repository.
    git(root, "rev-parse", "--git-dir")
    if not git(root, "rev-list", "-n", "1", "--all").strip():
        raise NoCommitsError()
    raise CheckError(f"--rev {rev}: no commit of that name in this repository (expected a branch, tag or commit id)")


def committed_metrics(root: Path, rev: str, pattern: str) -> dict[str, tuple[str, object]]:
    """Return the metrics committed at ``rev``. Raises NoCommitsError in a repository without commits."""
    commit = resolve_commit(root, rev)
    metrics: dict[str, tuple[str, object]] = {}
    for relative in sorted(git(root, "ls-tree", "-r", "--name-only", commit).splitlines()):
        if is_included(relative, pattern):
            data = parse_metrics(git_bytes(root, "show", f"{commit}:{relative}"), f"{rev}:{relative}")
            metrics.update({name: (relative, value) for name, value in flatten(data, PurePosixPath(relative).stem).items()})
    return metrics


# ---------------------------------------------------------------- comparison


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_worse(old: float, new: float, rule: Rule) -> bool:
    """True when ``new`` is worse than ``old`` by more than the rule allows.

    A NaN or infinite ``new`` after a finite ``old`` is worse in every direction except
    ``ignore``: it means a failed computation, not an improvement.
    """
    if rule.direction == "ignore":
        return False
    if math.isfinite(old) and not math.isfinite(new):
        return True
    allowed = max(rule.tolerance * abs(old), rule.abs_tolerance)
    if rule.direction == "lower":
        return new - old > allowed
    if rule.direction == "higher":
        return old - new > allowed
    if rule.direction == "either":
        return abs(new - old) > allowed
    return False


@dataclass
class Comparison:
    worse: list[Change]
    changed: list[Change]
    not_numbers: list[Change]
    new: list[tuple[str, str]]
    removed: list[tuple[str, str]]
    compared: int


def compare(old: dict[str, tuple[str, object]], new: dict[str, tuple[str, object]], rules: list[Rule]) -> Comparison:
    result = Comparison([], [], [], [], [], 0)
    for name in sorted(set(old) | set(new)):
        if name not in new:
            result.removed.append((name, old[name][0]))
            continue
        if name not in old:
            result.new.append((name, new[name][0]))
            continue
        change = Change(name, new[name][0], old[name][1], new[name][1], rule_for(name, rules))
        result.compared += 1
        if change.old == change.new:
            continue
        if not (_is_number(change.old) and _is_number(change.new)):
            result.not_numbers.append(change)
        elif is_worse(change.old, change.new, change.rule):
            result.worse.append(change)
        else:
            result.changed.append(change)
    return result


def format_number(value: object) -> str:
    if _is_number(value):
        return f"{value:.6g}"
    return json.dumps(value)


def format_relative(change: Change) -> str:
    relative = change.relative
    if relative is None:
        return ""
    if not math.isfinite(change.new):
        return "not finite"
    if math.isnan(relative):
        return ""
    if math.isinf(relative):
        return "from 0"
    return f"{relative:+.2%}"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, ["-" * w for w in widths], *rows]]
    return "\n".join(lines)


def change_table(changes: list[Change], rev: str) -> str:
    rows = [
        [c.name, c.path, format_number(c.old), format_number(c.new), format_relative(c), f"{c.rule.tolerance:g}", c.rule.direction, c.rule.pattern]
        for c in changes
    ]
    return table(["metric", "file", rev, "workspace", "change", "tolerance", "better", "rule"], rows)


def fails(result: Comparison, allow_removed: bool) -> bool:
    return bool(result.worse) or (bool(result.removed) and not allow_removed)


def report(result: Comparison, rev: str, verbose: bool, allow_removed: bool) -> str:
    parts = [
        f"compared {result.compared} metrics: {len(result.worse)} worse beyond tolerance, "
        f"{len(result.changed)} changed within tolerance or improved, {len(result.new)} new, {len(result.removed)} removed"
    ]
    if result.worse:
        parts.append(f"FAILED: {len(result.worse)} metric(s) got worse than at {rev} beyond their tolerance:\n" + change_table(result.worse, rev))
    if result.changed and verbose:
        parts.append("Changed within tolerance or improved:\n" + change_table(result.changed, rev))
    if result.not_numbers:
        parts.append("Changed values that are not numbers (not compared, do not fail the check):\n" + change_table(result.not_numbers, rev))
    if result.new:
        parts.append(f"New metrics, not at {rev} (reported only, do not fail the check):\n" + table(["metric", "file"], [list(item) for item in result.new]))
    if result.removed:
        removed_table = table(["metric", "file"], [list(item) for item in result.removed])
        if allow_removed:
            parts.append(f"Removed metrics, at {rev} but not in the workspace (allowed by --allow-removed):\n" + removed_table)
        else:
            parts.append(
                f"FAILED: {len(result.removed)} metric(s) at {rev} are missing from the workspace. "
                f"Rerun the stages that write them, or pass --allow-removed if the removal is intended:\n" + removed_table
            )
    if not fails(result, allow_removed):
        removed = ", removals allowed by --allow-removed" if result.removed else ""
        parts.append(f"passed: no metric got worse beyond its tolerance{removed}")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", default="HEAD", help="git revision whose committed metrics are the baseline (default: HEAD)")
    parser.add_argument("--metrics", default="reports/metrics/*.json", help="glob of the metrics files, relative to the repository root (default: reports/metrics/*.json)")
    parser.add_argument("--tolerances", default="metrics_tolerances.yaml", help="tolerance file, relative to the repository root (default: metrics_tolerances.yaml)")
    parser.add_argument("--root", default=".", help="repository root (default: the current directory)")
    parser.add_argument("--verbose", action="store_true", help="also list the metrics that changed within their tolerance or improved")
    parser.add_argument(
        "--allow-removed",
        action="store_true",
        help="pass although metrics at --rev are missing from the workspace, for an intended removal (they are still listed)",
    )
    args = parser.parse_args(argv)

    root = Path(args.root)
    no_commits = False
    try:
        rules = load_rules(root / args.tolerances)
        try:
            old = committed_metrics(root, args.rev, args.metrics)
        except NoCommitsError:
            no_commits = True
        new = workspace_metrics(root, args.metrics)
    except CheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    print(f"metrics check: {args.metrics} in the workspace against {args.rev}, tolerances from {args.tolerances}")
    if no_commits:
        print("passed: the repository has no commits yet, so there is nothing to compare against")
        return 0
    result = compare(old, new, rules)
    print(report(result, args.rev, args.verbose, args.allow_removed))
    return 1 if fails(result, args.allow_removed) else 0


if __name__ == "__main__":
    sys.exit(main())
