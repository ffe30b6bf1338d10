"""Compare evaluate results and run folders: one table of metrics x runs, and the --fail-if gate.

Everything here works on `Entry` objects (one column of the table) and returns strings or plain
data, so `quickstart` can print the same table the `compare` command prints.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from minillm_cli.errors import InputError
from minillm_cli.eval.metrics import METRICS, canonical_name, higher_is_better


@dataclass
class Entry:
    name: str
    source: Path
    kind: str  # "result" (an evaluate FILE.json) or "run" (an sft/distill folder)
    metrics: dict[str, dict]  # name -> {"mean", "std", "per_seed"}
    model: Optional[str] = None
    data: Optional[str] = None
    n: Optional[int] = None
    curve: list[dict] = field(default_factory=list)
    predictions: Optional[Path] = None
    given: list[Path] = field(default_factory=list)  # the paths that name it (--baseline PATH)
    protocol: Optional[dict] = None  # an evaluate result's "protocol" (how it was evaluated)


# ---------------------------------------------------------------------------- loading
def _from_result(name: str, path: Path, result: dict, extra: Optional[dict] = None) -> Entry:
    from minillm_cli.eval.results import predictions_path

    metrics = {k: dict(v) for k, v in result["metrics"].items()}
    metrics.update(extra or {})
    protocol = result.get("protocol")
    return Entry(name=name, source=path, kind="result", metrics=metrics, model=result.get("model"),
                 data=result.get("data"), n=result.get("n"),
                 predictions=predictions_path(path, result),
                 protocol=protocol if isinstance(protocol, dict) else None)


def load_entries(paths: Sequence[Path], names: Optional[Sequence[str]] = None) -> list[Entry]:
    """One entry per evaluate result; a run folder gives one entry per evaluate result found in it
    (or one with its training metrics only). Training metrics are the last logged value of each
    numeric metrics.jsonl key, named `train.<key>` -- up to the step whose weights the folder keeps
    where `--select-by` kept an earlier step than the last (its summary.json's `best_step`)."""
    from minillm_cli.eval.results import is_run_folder, load_result, load_run

    entries: list[Entry] = []
    for p in map(Path, paths):
        if p.is_dir():
            if not is_run_folder(p):
                raise InputError(f"{p} is a folder but not a run folder (no metrics.jsonl or run_config.json)")
            run = load_run(p)
            train = {f"train.{k}": {"mean": v, "std": 0.0, "per_seed": [v]} for k, v in run.final.items()}
            if run.kept_step is not None:  # (the step those figures, and the folder's weights, are from)
                train["train.kept_step"] = {"mean": float(run.kept_step), "std": 0.0, "per_seed": [float(run.kept_step)]}
            if run.results:
                for stem, rp, res in run.results:
                    nm = run.name if len(run.results) == 1 else f"{run.name}/{stem}"
                    e = _from_result(nm, rp, res, train)
                    e.kind, e.source, e.curve, e.given = "run", p, run.curve, [p, rp]
                    entries.append(e)
            else:
                cfg = run.config.get("config", run.config)  # run_config.json: {"command", "config", ...}
                if not isinstance(cfg, dict):
                    raise InputError(f"{p / 'run_config.json'}: 'config' is not a JSON object")
                model = cfg.get("student") or cfg.get("model")
                data = cfg.get("data")
                data = data.get("data") if isinstance(data, dict) else data
                entries.append(Entry(name=run.name, source=p, kind="run", metrics=train,
                                     model=model if isinstance(model, str) else None,
                                     data=data if isinstance(data, str) else None, curve=run.curve, given=[p]))
        else:
            entries.append(_from_result(p.stem, p, load_result(p)))
            entries[-1].given = [p]
    if names is not None:
        if len(names) != len(entries):
            raise InputError(f"--names gives {len(names)} names for {len(entries)} compared results "
                             f"({', '.join(e.name for e in entries)})")
        if any(not nm for nm in names):
            raise InputError(f"--names {','.join(names)!r}: every name must be non-empty")
        twice = sorted({nm for nm in names if names.count(nm) > 1})
        if twice:  # names the user chose are kept as given, so they must tell the results apart
            raise InputError(f"--names: {', '.join(twice)} given more than once")
        for e, nm in zip(entries, names):
            e.name = nm
    else:
        _dedupe_names(entries)
    return entries


def _dedupe_names(entries: list[Entry]) -> None:
    """Two files called result.json in different folders get their folder name as a prefix."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.name] = counts.get(e.name, 0) + 1
    for e in entries:
        if counts[e.name] > 1 and e.source.parent.name:
            e.name = f"{e.source.parent.name}/{e.name}"
    seen: dict[str, int] = {}
    for e in entries:
        if e.name in seen:
            seen[e.name] += 1
            e.name = f"{e.name}#{seen[e.name]}"
        else:
            seen[e.name] = 1


def find_entry(entries: Sequence[Entry], key: str, flag: str = "--baseline") -> Entry:
    """An entry by name, or by the path it was loaded from."""
    for e in entries:
        if e.name == key:
            return e
    kp = Path(key).resolve()
    for e in entries:
        if any(p.resolve() == kp for p in (e.source, *e.given)):
            return e
    raise InputError(f"{flag} {key!r} is none of the compared results ({', '.join(e.name for e in entries)})")


# Settings of an evaluate result's "protocol" that change its numbers (which examples, how they are
# prompted and decoded), in the order a note names them. Not the seeds (another draw of the same
# protocol), nor the teacher or dtype (named as given, not as resolved).
PROTOCOL_KEYS = ("split", "valid_size", "test_size", "split_seed", "limit", "template", "turns",
                 "max_prompt_length", "max_length", "max_new_tokens", "decoding", "temperature", "top_k",
                 "top_p", "no_repeat_ngram_size", "no_repeat_ngram_over", "cut_at_eos")
_SPLIT_KEYS = ("valid_size", "test_size", "split_seed")  # (meaningless under split "all")


def protocol_differences(entries: Sequence[Entry]) -> list[str]:
    """The protocol settings in which the compared evaluate results differ, one text per setting
    ("max_new_tokens 256 (sft, minillm) vs 64 (kd)"); results that record no protocol (or not that
    setting) are left out of it. Empty when they were all evaluated alike."""
    out = []
    for key in PROTOCOL_KEYS:
        groups: dict[str, list[str]] = {}
        for e in entries:
            p = e.protocol
            if not p or key not in p:
                continue
            value = p[key]
            if key in _SPLIT_KEYS and p.get("split", "all") == "all":
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = float(value)  # (4 and 4.0 are one setting)
            groups.setdefault(json.dumps(value), []).append(e.name)
        if len(groups) > 1:
            out.append(f"{key} " + " vs ".join(
                f"{_setting_text(json.loads(v))} ({', '.join(names)})" for v, names in groups.items()))
    return out


def _setting_text(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


# ---------------------------------------------------------------------------- the table
def metric_order(entries: Sequence[Entry]) -> list[str]:
    """Registry metrics in registry order, then other evaluate metrics, then training metrics."""
    present = {m for e in entries for m in e.metrics}
    known = [m for m in METRICS if m in present]
    other = sorted(m for m in present if m not in METRICS and not m.startswith("train."))
    train = sorted(m for m in present if m.startswith("train."))
    return known + other + train


def _mean(e: Entry, metric: str) -> Optional[float]:
    m = e.metrics.get(metric)
    v = m.get("mean") if m else None
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def best_names(entries: Sequence[Entry], metric: str) -> set[str]:
    """Names of the best run(s) for a metric; empty when the direction is unknown or < 2 values."""
    up = higher_is_better(metric)
    vals = {e.name: _mean(e, metric) for e in entries}
    vals = {k: v for k, v in vals.items() if v is not None}
    if up is None or len(vals) < 2:
        return set()
    target = max(vals.values()) if up else min(vals.values())
    return {k for k, v in vals.items() if v == target}


def comparison(entries: Sequence[Entry], baseline: Optional[str] = None) -> dict:
    """The table as plain data (this is also the --format json output)."""
    base = find_entry(entries, baseline) if baseline else None
    table: dict[str, dict] = {}
    for metric in metric_order(entries):
        values = {}
        for e in entries:
            m = e.metrics.get(metric)
            if m is None:
                continue
            cell = {"mean": _mean(e, metric), "std": m.get("std"), "per_seed": m.get("per_seed")}
            if base is not None and e is not base:
                b, v = _mean(base, metric), cell["mean"]
                cell["delta"] = None if b is None or v is None else v - b
            values[e.name] = cell
        best = sorted(best_names(entries, metric))
        table[metric] = {"higher_is_better": higher_is_better(metric), "best": best, "values": values}
    return {
        "runs": [{"name": e.name, "source": str(e.source), "kind": e.kind, "model": e.model,
                  "data": e.data, "n": e.n} for e in entries],
        "baseline": base.name if base else None,
        "metrics": table,
    }


def decimals_for(values) -> int:
    """Decimals that show about three significant digits of the largest value: one number format
    per table row, so means, spreads and deltas line up (23.20 ± 0.47, 0.812 ± 0.031)."""
    finite = [abs(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    top = max(finite, default=0.0)
    if top >= 100:
        return 1
    if top >= 1 or top == 0:
        return 2
    return min(6, 2 - math.floor(math.log10(top)))


def fmt_num(v: Optional[float], decimals: Optional[int] = None) -> str:
    if v is None:
        return "-"
    return f"{v:.{decimals_for([v]) if decimals is None else decimals}f}"


def _row_decimals(row: dict) -> int:
    return decimals_for([c["mean"] for c in row["values"].values()])


def _cell_text(cell: Optional[dict], decimals: Optional[int] = None) -> str:
    if cell is None:
        return "-"
    text = fmt_num(cell["mean"], decimals)
    # A single value (one seed, or a training-log value) has no spread worth printing.
    if cell.get("std") is not None and len(cell.get("per_seed") or []) > 1:
        text += f" ± {fmt_num(cell['std'], decimals)}"
    if cell.get("delta") is not None:  # no delta where the baseline lacks the metric
        d = cell["delta"]
        text += f" ({'+' if d >= 0 else ''}{fmt_num(d, decimals)})"
    return text


def _arrow(up: Optional[bool]) -> str:
    return "" if up is None else (" ↑" if up else " ↓")


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")  # a name with '|' must not open a column


def render_markdown(comp: dict) -> str:
    names = [r["name"] for r in comp["runs"]]
    lines = ["| metric | " + " | ".join(map(_md_cell, names)) + " |", "|---|" + "---:|" * len(names)]
    for metric, row in comp["metrics"].items():
        cells, dec = [], _row_decimals(row)
        for n in names:
            t = _cell_text(row["values"].get(n), dec)
            cells.append(f"**{t}**" if n in row["best"] else t)
        lines.append(f"| {_md_cell(metric)}{_arrow(row['higher_is_better'])} | " + " | ".join(cells) + " |")
    note = "mean ± std over seeds; best in bold; ↑ higher is better, ↓ lower is better"
    if comp["baseline"]:
        note += f"; (Δ) vs {comp['baseline']}"
    return "\n".join(lines) + f"\n\n{note}\n"


def render_csv(comp: dict) -> str:
    """Long format, one row per (metric, run): what spreadsheets and pandas read without help."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "run", "mean", "std", "seeds", "delta", "best", "higher_is_better"])
    for metric, row in comp["metrics"].items():
        for name, cell in row["values"].items():
            up = row["higher_is_better"]
            w.writerow([metric, name, _csv_num(cell["mean"]), _csv_num(cell.get("std")),
                        len(cell.get("per_seed") or []), _csv_num(cell.get("delta")),
                        int(name in row["best"]), "" if up is None else int(up)])
    return buf.getvalue()


def _csv_num(v) -> str:
    return "" if v is None else repr(float(v))


def render_json(comp: dict, **extra) -> str:
    from minillm_cli.eval.results import clean_json  # NaN read from a hand-made file -> null

    return json.dumps(clean_json({**comp, **extra}), indent=2, allow_nan=False) + "\n"


def rich_table(comp: dict):
    from rich.markup import escape
    from rich.table import Table

    title = "minillm compare" + (f" (Δ vs {escape(comp['baseline'])})" if comp["baseline"] else "")
    t = Table(title=title, caption="mean ± std over seeds; * best; ↑/↓ higher/lower is better")
    t.add_column("metric", style="bold")
    names = [r["name"] for r in comp["runs"]]
    for n in names:
        t.add_column(escape(n), justify="right")
    for metric, row in comp["metrics"].items():
        cells, dec = [], _row_decimals(row)
        for n in names:
            text = _cell_text(row["values"].get(n), dec)
            cells.append(f"[bold green]{text} *[/]" if n in row["best"] else text)
        t.add_row(escape(metric) + _arrow(row["higher_is_better"]), *cells)
    return t


# ---------------------------------------------------------------------------- the --fail-if gate
_TOKEN = re.compile(
    r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)(?![A-Za-z_])"
    r"|(?P<op><=|>=|==|!=|<|>)|(?P<lp>\()|(?P<rp>\))"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_./:\-]*))"
)
_FLIP = {"<": ">", ">": "<", "<=": ">=", ">=": "<=", "==": "==", "!=": "!="}
_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


@dataclass(frozen=True)
class Cmp:
    metric: str
    field: str  # "mean" or "std"
    op: str
    value: float

    def text(self) -> str:
        m = self.metric if self.field == "mean" else f"{self.metric}.{self.field}"
        return f"{m} {self.op} {self.value:g}"


def _tokenize(expr: str) -> list[tuple[str, str, int]]:
    toks, pos = [], 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = _TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise InputError(f"--fail-if {expr!r}: cannot read {expr[pos:].strip()!r}")
        kind = m.lastgroup
        text, start = m.group(kind), m.start(kind)
        if kind == "name" and text.lower() in ("and", "or"):
            kind = text.lower()
        toks.append((kind, text, start))
        pos = m.end()
    return toks


def parse_gate(expr: str):
    """Parse `METRIC OP NUMBER` comparisons joined by and/or (and binds tighter) with parentheses.
    Returns a tree of ("or", [...]), ("and", [...]) and Cmp leaves. No eval() of user text."""
    toks = _tokenize(expr)
    i = 0

    def fail(what: str):
        at = f"at {toks[i][1]!r}" if i < len(toks) else "at the end"
        raise InputError(f"--fail-if {expr!r}: expected {what} {at} "
                         "(e.g. 'rougeL < 20', 'rougeL < 20 or dist4 < 90')")

    def peek(kind):
        return i < len(toks) and toks[i][0] == kind

    def parse_or():
        nonlocal i
        parts = [parse_and()]
        while peek("or"):
            i += 1
            parts.append(parse_and())
        return parts[0] if len(parts) == 1 else ("or", parts)

    def parse_and():
        nonlocal i
        parts = [parse_atom()]
        while peek("and"):
            i += 1
            parts.append(parse_atom())
        return parts[0] if len(parts) == 1 else ("and", parts)

    def parse_atom():
        nonlocal i
        if peek("lp"):
            i += 1
            node = parse_or()
            if not peek("rp"):
                fail("')'")
            i += 1
            return node
        if peek("name") or peek("num"):
            first = toks[i]
            i += 1
            if not peek("op"):
                fail("a comparison (< <= > >= == !=)")
            op = toks[i][1]
            i += 1
            want = "num" if first[0] == "name" else "name"
            if not peek(want):
                fail("a number" if want == "num" else "a metric name")
            second = toks[i]
            i += 1
            name, num = (first[1], second[1]) if first[0] == "name" else (second[1], first[1])
            op = op if first[0] == "name" else _FLIP[op]
            metric, fld = name, "mean"
            for suffix in (".mean", ".std"):
                if name.endswith(suffix):
                    metric, fld = name[: -len(suffix)], suffix[1:]
            return Cmp(metric, fld, op, float(num))
        fail("a metric name or '('")

    if not toks:
        raise InputError("--fail-if: empty expression")
    tree = parse_or()
    if i != len(toks):
        fail("'and', 'or' or the end")
    return tree


def resolve_gate(tree, entries: Sequence[Entry]):
    """Map each metric of the gate to the name the results use (aliases allowed); InputError when
    no compared result has it. A result lacking a metric that others have never meets it."""
    present = {m for e in entries for m in e.metrics}

    def resolve(node):
        if isinstance(node, Cmp):
            if node.metric in present:
                return node
            # an alias (loss -> lm-loss) or a training metric (loss -> train.loss): never both,
            # or what the gate checks would depend on which results happen to be compared
            found = list(dict.fromkeys(c for c in (canonical_name(node.metric), f"train.{node.metric}")
                                       if c in present))
            if len(found) > 1:
                raise InputError(f"--fail-if: {node.metric!r} could mean {' or '.join(found)}; name one")
            if found:
                return Cmp(found[0], node.field, node.op, node.value)
            raise InputError(f"--fail-if: no compared result has metric {node.metric!r} "
                             f"(they have: {', '.join(sorted(present)) or 'none'})")
        return (node[0], [resolve(p) for p in node[1]])

    return resolve(tree)


def _holds(node, e: Entry) -> bool:
    if isinstance(node, Cmp):
        m = e.metrics.get(node.metric)
        v = m.get(node.field) if m else None
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return _OPS[node.op](float(v), node.value)
    results = [_holds(p, e) for p in node[1]]
    return any(results) if node[0] == "or" else all(results)


def _met(node, e: Entry) -> list[Cmp]:
    """The comparisons that make `node` hold for `e`: not one of an 'and' that failed as a whole
    ('rougeL < 20 or (dist4 < 90 and lm-loss > 3)' met by rougeL alone names rougeL alone)."""
    if isinstance(node, Cmp):
        return [node] if _holds(node, e) else []
    if not _holds(node, e):
        return []
    return [c for part in node[1] for c in _met(part, e)]


def _gate_num(v: float, c: Cmp) -> str:
    """v with as few digits as keep the printed comparison true (not '5.96 > 5.96')."""
    for digits in range(4, 18):
        s = f"{v:.{digits}g}"
        if _OPS[c.op](float(s), c.value) == _OPS[c.op](v, c.value):
            return s
    return repr(v)


def check_gate(tree, entries: Sequence[Entry]) -> list[str]:
    """One line per entry that meets the (resolved) condition, naming the values that met it."""
    tripped = []
    for e in entries:
        if _holds(tree, e):
            why = [f"{c.text().split(' ', 1)[0]} = {_gate_num(float(e.metrics[c.metric][c.field]), c)}"
                   f" {c.op} {c.value:g}" for c in _met(tree, e)]
            tripped.append(f"{e.name}: " + ", ".join(dict.fromkeys(why)))
    return tripped
