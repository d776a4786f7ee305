"""The stored row has a schema: every committed run's rows migrate to the current format and validate, a row with an
undeclared key is refused where it is made, and the readers read every committed run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ntk_bench.bench.output import compare
from ntk_bench.bench.store import row as rowschema
from ntk_bench.bench.store import rundir

ROOT = Path(__file__).resolve().parents[3]
RUNS = sorted(p.parent.name for p in (ROOT / "results").glob("*/results.jsonl"))
BASE = {"case_id": "structured/mlp()/N=2/M=x1/full/float32/cpu", "impl": "structured", "arch": "mlp",
        "arch_params": "{}", "N": 2, "M": 2, "x2": "x1", "mode": "full", "dtype": "float32", "device": "cpu",
        "status": "ok"}


def _lines(run: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "results" / run / "results.jsonl").read_text().splitlines()]


def test_the_committed_runs_are_there():
    assert len(RUNS) >= 10, RUNS


@pytest.mark.parametrize("run", RUNS)
def test_every_row_of_a_committed_run_migrates_and_validates(run, caplog):
    lines = _lines(run)
    written = [obj for obj in lines if "header" not in obj]
    with caplog.at_level(logging.WARNING, logger="ntk_bench"):
        rows = rundir.read_rows(ROOT / "results" / run / "results.jsonl")
    assert caplog.records == [], [r.getMessage() for r in caplog.records]
    assert len(rows) == len(written)
    for obj, row in zip(written, rows):
        as_read = row.model_dump(mode="json", exclude_unset=True)
        # the values as written, under the names the migrations give them (format 3: kind -> origin), plus what
        # they add (the clock of a timed row of format 1)
        renamed = {("origin" if k == "kind" else k): v for k, v in obj.items()}
        assert {k: v for k, v in as_read.items() if k in renamed} == renamed
        assert set(as_read) - set(renamed) <= {"clock"}
        assert "kind" not in as_read
        if obj.get("time_median_s") is not None:
            assert row.clock in ("wall", "cpu")


@pytest.mark.parametrize("run", ["2026-11-23-mlp_cpu", "2026-12-07-quick-cpu-load-clock-cpu"])
def test_report_reads_a_committed_run_of_each_format_into_a_new_folder(run, tmp_path):
    from ntk_bench.bench.output import report

    text = report.write_report(ROOT / "results" / run, tmp_path).read_text()
    assert "match the row schema" not in text and (tmp_path / "results.csv").is_file()


@pytest.mark.parametrize("run", RUNS)
def test_compare_reads_every_committed_run(run, capsys):
    d = str(ROOT / "results" / run)
    assert compare.main([d, d]) == 0  # a run against itself: nothing changed
    out = capsys.readouterr()
    assert out.out.startswith("# ntk-bench compare:") and "Traceback" not in out.err, out.err


def test_every_field_is_documented():
    undocumented = [f"{model.__name__}.{name}" for model in (rowschema.Row, rowschema.PairedRecord, rowschema.Header)
                    for name, f in model.model_fields.items() if not (f.description or "").strip()]
    assert undocumented == []


def test_a_row_with_an_undeclared_key_or_a_wrong_type_is_refused_naming_it():
    with pytest.raises(rowschema.RowError, match="worker_hostname"):
        rowschema.check_row({**BASE, "worker_hostname": "h"})
    with pytest.raises(rowschema.RowError, match="N"):
        rowschema.check_row({**BASE, "N": "two"})
    with pytest.raises(rowschema.RowError, match="status"):
        rowschema.check_row({k: v for k, v in BASE.items() if k != "status"})
    assert rowschema.check_row({**BASE, "compiled": True, "compile_s": 1.5}) == {**BASE, "compiled": True,
                                                                                  "compile_s": 1.5}


def test_a_format_1_file_migrates_and_an_undeclared_key_is_kept_with_a_warning(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    timed = {**BASE, "time_median_s": 0.1, "from_a_dev_version": 3}
    path.write_text(json.dumps({"header": {"sweep": "s"}}) + "\n" + json.dumps(timed) + "\n"
                    + json.dumps({"header": {"format_version": rowschema.FORMAT_VERSION}}) + "\n"
                    + json.dumps({**BASE, "time_median_s": 0.2}) + "\n")
    with caplog.at_level(logging.WARNING, logger="ntk_bench"):
        (_, (old,)), (_, (new,)) = rundir.read_segments(path)
    assert old["clock"] == "wall" and old["from_a_dev_version"] == 3  # format 1: timed on the wall clock
    assert "clock" not in new  # format 2 rows say their clock themselves
    assert any("from_a_dev_version" in r.getMessage() for r in caplog.records)
    rows = rundir.read_rows(path, warn=False)
    assert [r.clock for r in rows] == ["wall", None]


def test_a_row_that_does_not_match_the_schema_is_left_out_by_read_rows_and_said(tmp_path, caplog):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"header": {"format_version": rowschema.FORMAT_VERSION}}) + "\n"
                    + json.dumps({**BASE, "N": "many"}) + "\n" + json.dumps(BASE) + "\n")
    with caplog.at_level(logging.WARNING, logger="ntk_bench"):
        rows = rundir.read_rows(path)
    assert len(rows) == 1 and any("left out 1 row" in r.getMessage() and "N" in r.getMessage()
                                  for r in caplog.records)


@pytest.mark.parametrize("run", sorted(p.parent.name for p in (ROOT / "results").glob("*/paired.jsonl")))
def test_every_committed_paired_record_validates(run):
    records = [json.loads(line) for line in (ROOT / "results" / run / "paired.jsonl").read_text().splitlines()]
    assert records and all(rowschema.check_paired(r) == r for r in records)


@pytest.mark.parametrize("run", RUNS)
def test_every_committed_header_validates(run):
    headers = [obj["header"] for obj in _lines(run) if "header" in obj]
    assert headers and all(rowschema.check_header(h) == h for h in headers)
    assert all(rowschema.Header.model_validate(h).format_version == h.get("format_version", 1) for h in headers)


def test_a_header_field_of_the_wrong_type_is_refused_naming_it():
    with pytest.raises(rowschema.RowError, match="cases"):
        rowschema.check_header({"format_version": rowschema.FORMAT_VERSION, "cases": "many"})
    assert rowschema.check_header({"format_version": 2, "slots": 3}) == {"format_version": 2, "slots": 3}
