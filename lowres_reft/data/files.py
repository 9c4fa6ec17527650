"""Math data sets stored as tables (hub data sets and local jsonl/parquet/csv/save_to_disk copies) -> Problems.

Each known table has a schema (hub id, field names, a row adapter); `load_table` finds the split (on the hub or
under `[data] path`), checks its fields and cells, shuffles with `shuffle_seed` and truncates. What each data
set's rows mean is described in `data.py`'s module docstring.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lowres_reft.data.problems import Problem
from lowres_reft.utils.errors import UsageError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from lowres_reft.config import DataConfig

log = logging.getLogger("lowres_reft.data")

# --------------------------------------------------------------------------------------------------
# Row -> Problem adapters
# --------------------------------------------------------------------------------------------------

_GSM8K_CALC = re.compile(r"<<[^<>]*>>")
_FLOAT_ZERO = re.compile(r"(?<![\d.])(\d+)\.0+(?![\d.])")


def _text(value: Any) -> str | None:
    """A cell as stripped text; None for missing/empty values."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return _format_number(value)
    text = str(value).strip()
    return text or None


def _format_number(value: float) -> str:
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return f"{value:.10g}"


def _gsm8k_number(text: str) -> str:
    return text.strip().replace(",", "").rstrip(".").strip()


def _gsm8k_answer(raw: str) -> tuple[str, str | None]:
    """GSM8K `answer` text -> (final answer, cleaned solution). Plain text without `####` is the answer itself."""
    if "####" not in raw:
        return _gsm8k_number(raw), None
    work, final = raw.rsplit("####", 1)
    answer = _gsm8k_number(final)
    return answer, _gsm8k_solution(work, answer)


def _gsm8k_solution(work: str, answer: str) -> str:
    work = _GSM8K_CALC.sub("", work)
    lines = [line.rstrip() for line in work.strip().splitlines()]
    lines = [line for line in lines if line]
    return "\n".join(lines + [f"The answer is {answer}."])


@dataclass(frozen=True)
class _Fields:
    question: str
    answer: str
    # Solution column, None when the data has none.
    solution: str | None


def _row_gsm8k(row: dict[str, Any], f: _Fields) -> Problem | None:
    question, raw = _text(row.get(f.question)), _text(row.get(f.answer))
    if question is None or raw is None:
        return None
    answer, solution = _gsm8k_answer(raw)
    if f.solution is not None and f.solution != f.answer:
        # An explicit solution column: cleaned the same way when it is GSM8K-style, else used as is.
        text = _text(row.get(f.solution))
        if text is None:
            solution = None
        elif "####" in text:
            solution = _gsm8k_solution(text.rsplit("####", 1)[0], answer)
        else:
            solution = _GSM8K_CALC.sub("", text).strip()
    return Problem(question, answer, solution) if answer else None


def _svamp_question(body: str | None, question: str | None) -> str | None:
    if question is None:
        return None
    if body is None:
        return question
    body = body.rstrip(" ,;:")
    if body and body[-1] not in ".?!":
        body += "."
    return f"{body} {question}"


def _svamp_equation(equation: str, answer: str) -> str:
    eq = _FLOAT_ZERO.sub(r"\1", " ".join(equation.split()))
    eq = eq.replace("( ", "(").replace(" )", ")")
    return f"{eq} = {answer}. The answer is {answer}."


def _row_svamp(row: dict[str, Any], f: _Fields) -> Problem | None:
    # With a question_field override the question is that field alone; by default Body + Question.
    if f.question == "Question":
        question = _svamp_question(_text(row.get("Body")), _text(row.get("Question")))
    else:
        question = _text(row.get(f.question))
    value = row.get(f.answer)
    if isinstance(value, str):
        try:
            value = float(value.replace(",", ""))
        except ValueError:
            pass
    answer = _text(value)
    if question is None or answer is None:
        return None
    solution = None
    if f.solution is not None:
        equation = _text(row.get(f.solution))
        if equation is not None:
            solution = _svamp_equation(equation, answer) if f.solution == "Equation" else equation
    return Problem(question, answer, solution)


def _row_plain(row: dict[str, Any], f: _Fields) -> Problem | None:
    question, answer = _text(row.get(f.question)), _text(row.get(f.answer))
    if question is None or answer is None:
        return None
    solution = _text(row.get(f.solution)) if f.solution is not None else None
    return Problem(question, answer, solution)


@dataclass(frozen=True)
class _Schema:
    hub_id: str | None
    hub_config: str | None
    question: str
    answer: str
    solution: str | None
    row: Callable[[dict[str, Any], _Fields], Problem | None]
    # Local-file format of the generic loaders ("json", "parquet", "csv"); None: guessed from the extension.
    local_format: str | None = None
    note: str = ""
    # Columns the row function reads besides the question/answer/solution fields (svamp: Body + Question).
    extra_columns: tuple[str, ...] = ()


_SCHEMAS: dict[str, _Schema] = {
    "gsm8k": _Schema("openai/gsm8k", "main", "question", "answer", None, _row_gsm8k),
    "svamp": _Schema("ChilleD/SVAMP", None, "Question", "Answer", "Equation", _row_svamp,
                     extra_columns=("Body", "Question")),
    "math12k": _Schema("hiyouga/math12k", None, "problem", "answer", "solution", _row_plain),
    "math500": _Schema(
        "HuggingFaceH4/MATH-500", None, "problem", "answer", "solution", _row_plain,
        note="MATH-500 only has a test split: use it for evaluation (eval_split = \"test\")",
    ),
    "jsonl": _Schema(None, None, "question", "answer", None, _row_plain, local_format="json"),
    "parquet": _Schema(None, None, "question", "answer", None, _row_plain, local_format="parquet"),
    "csv": _Schema(None, None, "question", "answer", None, _row_plain, local_format="csv"),
}
_ALIASES = {s.hub_id.lower(): name for name, s in _SCHEMAS.items() if s.hub_id}
SCHEMA_NAMES: tuple[str, ...] = tuple(_SCHEMAS)


_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_SHARD = re.compile(r"(?P<split>.+?)-\d+-of-\d+(?:-[0-9a-f]+)?")

def _first_line(err: BaseException) -> str:
    text = first_line(err)
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _load_split(
    name: str, schema: _Schema, cfg: DataConfig, split_name: str, split_key: str
) -> tuple[datasets.Dataset, str]:
    key, local = ("eval_path", cfg.eval_path) if split_key == "eval_split" and cfg.eval_path is not None else ("path", cfg.path)
    if local is not None:
        if not local.strip():  # Path("") is the current directory: never what an empty setting means
            raise UsageError(f'[data] {key} = "": empty; omit it to use the named dataset, or give a file or directory')
        path = Path(local).expanduser()
        if not path.exists():
            raise UsageError(f"[data] {key} = {local!r}: no such file or directory")
        if path.is_file():
            if key == "path" and split_key == "eval_split":
                raise UsageError(f"[data] path = {local!r} is one file, which would be the train and the eval split alike "
                                 "(accuracy measured on training problems): set [data] eval_path to the eval file, or "
                                 "make path a directory with one file per split (train.jsonl, test.jsonl)")
            return _load_file(path, schema, [path]), str(path)
        return _load_directory(path, schema, split_name, split_key)
    if schema.hub_id is None:
        raise UsageError(
            f'[data] name = "{name}" reads local files: set [data] path = "..." to a {name} file '
            f"or to a directory holding {split_name}.{'jsonl' if name == 'jsonl' else name}"
        )
    return _load_hub(name, schema, split_name, split_key), schema.hub_id


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]  # ConnectionError, TimeoutError, FileNotFoundError, ...
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from datasets.exceptions import DatasetsError

        errors.append(DatasetsError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests

        errors.append(requests.RequestException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _load_hub(name: str, schema: _Schema, split_name: str, split_key: str) -> datasets.Dataset:
    import datasets

    assert schema.hub_id is not None
    try:
        loaded = datasets.load_dataset(schema.hub_id, schema.hub_config)
    except _hub_errors() as err:
        raise UsageError(
            f"cannot load dataset {name} ({schema.hub_id}) from the Hugging Face Hub: it needs network access "
            f"or a local copy; download it elsewhere and point the recipe at it with [data] path = \"...\" "
            f"(a .jsonl/.parquet file or a directory) ({_first_line(err)})"
        ) from None
    return _pick_split(loaded, split_name, split_key, schema.hub_id, schema)


def _pick_split(
    loaded: Any, split_name: str, split_key: str, source: str, schema: _Schema
) -> datasets.Dataset:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    available = list(loaded.keys())
    if split_name not in available:
        note = f"; {schema.note}" if schema.note else ""
        raise UsageError(
            f"[data] {split_key} = {split_name!r}: no such split in {source} "
            f"(available: {', '.join(available) or 'none'}){note}"
        )
    return loaded[split_name]


def _file_format(path: Path, schema: _Schema) -> str:
    if schema.local_format is not None:
        return schema.local_format
    fmt = _EXTENSIONS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(
            f"[data] path = {str(path)!r}: cannot tell the file format from the extension "
            f"(expected one of {', '.join(_EXTENSIONS)})"
        )
    return fmt


def _load_file(path: Path, schema: _Schema, files: list[Path]) -> datasets.Dataset:
    """Load data files (one format) as one Dataset."""
    import datasets

    fmt = _file_format(files[0], schema)
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:  # datasets' json builder fails on an empty file with a bare StopIteration
        raise UsageError(f"[data] path: {empty[0]} is empty")
    for file in files:  # what datasets would report in its own words (or log before failing): said here, in ours
        _check_text_file(file, fmt)
    datasets.utils.logging.set_verbosity_error()  # its warnings would leak to stderr before our one-line error
    try:
        return datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")
    except (datasets.exceptions.DatasetsError, ValueError, OSError, UnicodeDecodeError, StopIteration) as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        if isinstance(cause, StopIteration) or isinstance(err, StopIteration):  # blank lines only: no rows
            raise UsageError(f"[data] path: {files[0]} has no rows") from None
        where = str(files[0]) if len(files) == 1 else f"{len(files)} files in {path}"
        raise UsageError(f"[data] path: cannot read {where} as {fmt} ({_first_line(cause)})") from None


def _check_text_file(file: Path, fmt: str) -> None:
    """A JSON-lines or CSV file with no rows, or a JSON line that does not parse: a one-line error naming the file and
    the 1-based line (a .json document, an array or an object, is left to datasets)."""
    if fmt not in ("json", "csv"):
        return
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"[data] path: {file} is not a UTF-8 text file") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) < (2 if fmt == "csv" else 1):  # a CSV's first line is its header
        raise UsageError(f"[data] path: {file} has no rows")
    if fmt == "csv" or lines[0][1].lstrip().startswith("["):
        return
    try:
        json.loads(text)
        return  # one JSON document (e.g. an object of columns)
    except json.JSONDecodeError:
        pass
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"[data] path: {file}, line {number}: not valid JSON ({err.msg}); every line must be one "
                             "JSON object") from None
        if not isinstance(row, dict):
            raise UsageError(f"[data] path: {file}, line {number}: a JSON {type(row).__name__}, not an object; every "
                             "line must be one JSON object") from None


def _split_of(file: Path) -> str:
    stem = file.name[: -len(file.suffix)] if file.suffix else file.name
    match = _SHARD.fullmatch(stem)
    if match:
        return match.group("split")
    if stem.isdigit():  # parquet-converter layout: <config>/<split>/0000.parquet
        return file.parent.name
    return stem


def _load_directory(path: Path, schema: _Schema, split_name: str, split_key: str) -> tuple[datasets.Dataset, str]:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        try:
            loaded = datasets.load_from_disk(str(path))
        except (datasets.exceptions.DatasetsError, ValueError, OSError) as err:
            raise UsageError(f"[data] path = {str(path)!r}: cannot load the saved dataset ({_first_line(err)})") from None
        return _pick_split(loaded, split_name, split_key, str(path), schema), str(path)

    allowed = {ext for ext, fmt in _EXTENSIONS.items() if schema.local_format in (None, fmt)}
    by_split: dict[str, list[Path]] = {}
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path)
        if not file.is_file() or file.suffix.lower() not in allowed or any(p.startswith(".") for p in rel.parts):
            continue
        by_split.setdefault(_split_of(file), []).append(file)
    files = by_split.get(split_name)
    if not files:
        found = ", ".join(sorted(by_split)) or "none"
        ext = "jsonl" if schema.local_format in (None, "json") else schema.local_format
        note = f"; {schema.note}" if schema.note else ""
        raise UsageError(
            f"[data] {split_key} = {split_name!r}: no {split_name}.{ext} (or {split_name}-*.{ext} shards) "
            f"in {path} (splits found: {found}){note}"
        )
    # Several directories with this split (e.g. gsm8k's main/ and socratic/): prefer the hub config's one.
    dirs = sorted({f.parent for f in files})
    if len(dirs) > 1 and schema.hub_config:
        preferred = [d for d in dirs if schema.hub_config in d.relative_to(path).parts]
        if preferred:
            dirs = preferred
    if len(dirs) > 1:
        listed = ", ".join(str(d.relative_to(path)) or "." for d in dirs)
        raise UsageError(
            f"[data] path = {str(path)!r}: {split_name!r} data in several folders ({listed}); "
            "point [data] path at one of them"
        )
    files = [f for f in files if f.parent == dirs[0]]
    by_format: dict[str, Path] = {}
    for f in files:
        by_format.setdefault(_EXTENSIONS[f.suffix.lower()], f)
    if len(by_format) > 1:  # e.g. train.csv next to train.jsonl: which one is meant is a guess
        listed = " and ".join(str(f) for f in by_format.values())
        raise UsageError(f"[data] {split_key} = {split_name!r}: both {listed} hold this split; remove one, or point [data] path at a file")
    source = str(files[0]) if len(files) == 1 else f"{dirs[0]}/{split_name}*"
    return _load_file(path, schema, files), source


def _resolve_fields(schema: _Schema, cfg: DataConfig, columns: list[str], source: str) -> _Fields:
    question = cfg.question_field or schema.question
    if cfg.question_field is None and schema.hub_id is None and question not in columns:
        from lowres_reft.data.trl_rows import question_column  # TRL-style rows: a prompt or messages column

        question = question_column(columns) or question
    answer = cfg.answer_field or schema.answer
    solution = cfg.solution_field or schema.solution
    have = ", ".join(columns) or "none"
    for key, field in (("question_field", question), ("answer_field", answer)):
        if field not in columns:
            how = "set" if getattr(cfg, key) is None else "fix"
            raise UsageError(
                f"{source}: no {key.split('_')[0]} field {field!r} (fields: {have}); "
                f'{how} [data] {key} = "..." to name the column'
            )
    if solution is not None and solution not in columns:
        if cfg.solution_field is not None:
            raise UsageError(
                f"{source}: no solution field {solution!r} (fields: {have}); "
                'fix [data] solution_field = "..." or remove it'
            )
        solution = None
    return _Fields(question, answer, solution)


def _check_cell_types(columns: dict[str, list[Any]], source: str) -> None:
    """Text fields hold text or numbers; a bool/list/dict/bytes cell would silently become "False", "[1, 2]" or
    "b'\\xff'" as a question or gold answer, so it is refused with its row (1-based) and field."""
    for name, values in columns.items():
        for row, value in enumerate(values, start=1):
            if value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                continue
            raise UsageError(f"{source}: row {row}, field {name!r}: a {type(value).__name__} value ({_short(value)}); "
                             "questions, answers and solutions must be text or numbers")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _to_problems(
    ds: datasets.Dataset, schema: _Schema, fields: _Fields, seed: int, limit: int | None, source: str
) -> list[Problem]:
    wanted = [fields.question, fields.answer, fields.solution, *schema.extra_columns]
    wanted = [c for c in dict.fromkeys(wanted) if c]
    columns = ds.select_columns([c for c in wanted if c in ds.column_names]).to_dict()
    n_rows = ds.num_rows
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    if fields.question in columns:  # a TRL-style `messages` cell (list of {role, content}) -> its last user message
        from lowres_reft.data.trl_rows import question_text

        columns[fields.question] = [question_text(v) for v in columns[fields.question]]
    _check_cell_types(columns, source)
    problems: list[Problem] = []
    skipped = 0
    for i in order:
        if limit is not None and len(problems) >= limit:
            break
        problem = schema.row({k: v[i] for k, v in columns.items()}, fields)
        if problem is None:
            skipped += 1
        else:
            problems.append(problem)
    if skipped:
        log.warning("%s: skipped %d row(s) with an empty question or answer", source, skipped)
    if not problems:
        raise UsageError(f"{source}: no usable problems ({n_rows} rows, none with both a question and an answer)")
    return problems


def load_table(name: str, cfg: DataConfig, split: str, limit: int | None) -> list[Problem] | None:
    """The problems of `split` ("train"/"eval") of the table data set `name`; None when no schema has that name."""
    schema = _SCHEMAS.get(name) or _SCHEMAS.get(_ALIASES.get(name.lower(), ""))
    if schema is None:
        return None
    split_name = cfg.train_split if split == "train" else cfg.eval_split
    split_key = "train_split" if split == "train" else "eval_split"
    ds, source = _load_split(name, schema, cfg, split_name, split_key)
    fields = _resolve_fields(schema, cfg, ds.column_names, source)
    return _to_problems(ds, schema, fields, cfg.shuffle_seed, limit, source)
