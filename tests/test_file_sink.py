"""adapters.file_sink: JSONL and CSV score files on a real file system, rotation that loses no
line, flush policy, and faults (a full device, a blocked directory) that never reach the caller."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path

import pytest

from adapters import file_sink
from adapters.file_sink import CsvSink, JsonlSink, Options, csv_columns
from adapters.registry import make_sink
from somad.events import AlertEvent, RecordScored, Timescale

WAIT_S = 5.0  # upper bound on any wait for the writer thread


def score(i: int, stream: str = "uart0", anomaly: float = 0.1) -> RecordScored:
    return RecordScored(stream=stream, time=1_700_000_000.0 + i, index=i, record=f"{i},{i * 0.5}\n".encode(), bits=1.0 + i / 1000, anomaly=anomaly)


def alert(kind: str = "open") -> AlertEvent:
    return AlertEvent(
        kind=kind, stream="uart0", alert_id="a1", started_at=1_700_000_000.0, time=1_700_000_001.0, peak_anomaly=0.995,
        peak_bits=7.5, records=1, record=b"999\x00\n", timescales=(Timescale(band=3, tau_bytes=4.2, share=0.6),),
    )  # fmt: skip


def run_sink(sink, events, timeout: float = WAIT_S) -> dict:
    sink.start()
    for event in events:
        sink.send(event)
    sink.stop(timeout=timeout)
    return sink.stats()


def wait_until(condition, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def files_oldest_first(path: Path) -> list[Path]:
    rotated = sorted(path.parent.glob(path.name + ".*"), key=lambda p: -int(p.suffix[1:]))
    return rotated + ([path] if path.exists() else [])


def read_jsonl(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for p in paths for line in p.read_text().splitlines()]


# ---------------------------------------------------------------------------- JSONL


def test_jsonl_writes_each_event_dict_in_order(tmp_path):
    events = [score(0), alert("open"), score(1), alert("close")]
    stats = run_sink(JsonlSink(Options(path=str(tmp_path / "{stream}.jsonl")), name="uart0"), events)
    assert read_jsonl([tmp_path / "uart0.jsonl"]) == [e.to_dict() for e in events]
    assert stats == {"sent": 4, "dropped": 0, "errors": 0, "rotations": 0, "queued": 0}


def test_rotation_keeps_every_line_when_they_fit(tmp_path):
    path = tmp_path / "s.jsonl"
    line_bytes = len(json.dumps(score(100).to_dict(), separators=(",", ":"))) + 1
    max_bytes = 10 * line_bytes
    events = [score(i) for i in range(100, 135)]  # 35 lines: 4 files of <= 10 lines
    stats = run_sink(JsonlSink(Options(path=str(path), max_bytes=max_bytes, keep=3)), events)
    files = files_oldest_first(path)
    assert [f.name for f in files] == ["s.jsonl.3", "s.jsonl.2", "s.jsonl.1", "s.jsonl"]
    assert all(f.stat().st_size <= max_bytes for f in files)
    assert [line["index"] for line in read_jsonl(files)] == list(range(100, 135))  # none lost, none twice
    assert stats["rotations"] == 3 and stats["sent"] == 35


def test_rotation_keeps_n_files_holding_the_newest_lines(tmp_path):
    path = tmp_path / "s.jsonl"
    line_bytes = len(json.dumps(score(100).to_dict(), separators=(",", ":"))) + 1
    events = [score(i) for i in range(100, 200)]
    run_sink(JsonlSink(Options(path=str(path), max_bytes=5 * line_bytes, keep=2)), events)
    files = files_oldest_first(path)
    assert [f.name for f in files] == ["s.jsonl.2", "s.jsonl.1", "s.jsonl"]
    indexes = [line["index"] for line in read_jsonl(files)]
    assert indexes == list(range(indexes[0], 200))  # contiguous up to the newest: no gap
    assert len(indexes) > 2 * 5


def test_a_line_longer_than_max_bytes_is_written_whole(tmp_path):
    path = tmp_path / "s.jsonl"
    big = RecordScored(stream="s", time=0.0, index=0, record=b"x" * 200, bits=1.0, anomaly=0.0)
    run_sink(JsonlSink(Options(path=str(path), max_bytes=50, keep=5)), [score(1), big, score(2)])
    assert [line["index"] for line in read_jsonl(files_oldest_first(path))] == [1, 0, 2]


def test_keep_zero_rotates_into_nothing_and_a_smaller_keep_cleans_up(tmp_path):
    path = tmp_path / "s.jsonl"
    for i in range(1, 6):
        (tmp_path / f"s.jsonl.{i}").write_text("{}\n")
    path.write_text("{}\n" * 100)
    run_sink(JsonlSink(Options(path=str(path), max_bytes=150, keep=0)), [score(7)])
    assert [f.name for f in files_oldest_first(path)] == ["s.jsonl"]
    assert [line["index"] for line in read_jsonl([path])] == [7]


def test_appends_to_an_existing_file_and_mends_a_torn_last_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"index":1}\n{"index":2,"tor')  # a crash mid-line
    run_sink(JsonlSink(Options(path=str(path))), [score(3)])
    lines = path.read_text().splitlines()
    assert lines[0] == '{"index":1}'
    assert lines[1] == '{"index":2,"tor'
    assert json.loads(lines[2])["index"] == 3


def test_non_finite_numbers_become_null(tmp_path):
    run_sink(JsonlSink(Options(path=str(tmp_path / "s.jsonl"))), [score(0, anomaly=math.nan)])
    line = (tmp_path / "s.jsonl").read_text()
    assert json.loads(line)["anomaly"] is None
    assert "NaN" not in line


# ---------------------------------------------------------------------------- CSV


def test_csv_header_on_every_file_and_rows_round_trip(tmp_path):
    path = tmp_path / "s.csv"
    events = [score(i) for i in range(40)] + [alert("open")]
    run_sink(CsvSink(Options(path=str(path), max_bytes=1200, keep=10)), events)
    files = files_oldest_first(path)
    assert len(files) > 2
    rows = []
    for f in files:
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            assert reader.fieldnames == csv_columns("both")
            rows += list(reader)
    assert len(rows) == 41
    for event, row in zip(events, rows):
        expected = event.to_dict()
        assert row["event"] == expected["event"]
        assert float(row["time"]) == expected["time"]
        assert row["record"] == expected["record"]
    assert [int(r["index"]) for r in rows[:40]] == list(range(40))
    assert float(rows[0]["bits"]) == score(0).bits  # full precision
    assert json.loads(rows[40]["timescales"]) == [{"band": 3, "tau_bytes": 4.2, "share": 0.6}]
    assert rows[0]["alert_id"] == "" and rows[40]["index"] == ""


def test_csv_with_other_columns_is_rotated_out_not_mixed(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("old,columns\n1,2\n")
    run_sink(CsvSink(Options(path=str(path), events="scores")), [score(5)])
    assert (tmp_path / "s.csv.1").read_text() == "old,columns\n1,2\n"
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [r["index"] for r in rows] == ["5"]
    assert list(rows[0]) == ["event", "stream", "time", "index", "record", "bits", "anomaly"]


def test_csv_appends_under_its_own_header(tmp_path):
    path = tmp_path / "s.csv"
    run_sink(CsvSink(Options(path=str(path), events="scores")), [score(1)])
    run_sink(CsvSink(Options(path=str(path), events="scores")), [score(2)])  # daemon restarted
    lines = path.read_text().splitlines()
    assert lines[0].startswith("event,stream") and len(lines) == 3
    assert not (tmp_path / "s.csv.1").exists()


# ---------------------------------------------------------------------------- what is written, when


@pytest.mark.parametrize("events, kinds", [("scores", ["score"]), ("alerts", ["alert_open"]), ("both", ["score", "alert_open"])])
def test_events_option_filters_without_counting_drops(tmp_path, events, kinds):
    stats = run_sink(JsonlSink(Options(path=str(tmp_path / "s.jsonl"), events=events)), [score(0), alert("open")])
    assert [line["event"] for line in read_jsonl([tmp_path / "s.jsonl"])] == kinds
    assert stats["dropped"] == 0 and stats["sent"] == len(kinds)


def test_flush_seconds_zero_puts_lines_on_disk_at_once(tmp_path):
    path = tmp_path / "s.jsonl"
    sink = JsonlSink(Options(path=str(path), flush_seconds=0))
    sink.start()
    try:
        sink.send(score(0))
        assert wait_until(lambda: path.exists() and path.read_text().endswith("\n"))
        assert wait_until(lambda: sink.stats()["sent"] == 1)
    finally:
        sink.stop()


def test_lines_wait_for_the_flush_interval_then_stop_flushes_them(tmp_path):
    path = tmp_path / "s.jsonl"
    sink = JsonlSink(Options(path=str(path), flush_seconds=60))
    sink.start()
    sink.send(score(0))
    assert wait_until(lambda: sink.stats()["queued"] == 0)
    time.sleep(0.2)
    assert not path.exists() or path.read_text() == ""  # buffered, not yet due
    assert sink.stats()["sent"] == 0
    sink.stop()
    assert [line["index"] for line in read_jsonl([path])] == [0]
    assert sink.stats()["sent"] == 1


def test_a_full_queue_drops_and_counts(tmp_path):
    sink = JsonlSink(Options(path=str(tmp_path / "s.jsonl"), queue_events=2))
    for i in range(5):  # writer not started yet: the queue fills
        sink.send(score(i))
    assert sink.stats() == {"sent": 0, "dropped": 3, "errors": 0, "rotations": 0, "queued": 2}
    stats = run_sink(sink, [])
    assert stats["sent"] == 2 and stats["dropped"] == 3
    sink.send(score(9))  # after stop: refused, counted
    assert sink.stats()["dropped"] == 4


def test_stop_without_start_counts_the_queue_as_dropped(tmp_path):
    sink = JsonlSink(Options(path=str(tmp_path / "s.jsonl")))
    sink.send(score(0))
    sink.stop()
    sink.stop()
    assert sink.stats()["dropped"] == 1 and not (tmp_path / "s.jsonl").exists()


# ---------------------------------------------------------------------------- faults


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_device_is_counted_not_raised():
    sink = JsonlSink(Options(path="/dev/full", flush_seconds=0, max_bytes=0))
    stats = run_sink(sink, [score(i) for i in range(3)])  # write() succeeds into the buffer; flush gets ENOSPC
    assert stats["errors"] >= 1
    assert stats["sent"] == 0 and stats["dropped"] == 3


def test_a_blocked_directory_recovers_once_it_is_writable(tmp_path, monkeypatch):
    monkeypatch.setattr(file_sink, "RETRY_MIN_S", 0.05)  # retry sooner than the production 1 s
    blocker = tmp_path / "out"
    blocker.write_text("a file where the directory should be")
    path = blocker / "s.jsonl"
    sink = JsonlSink(Options(path=str(path), flush_seconds=0))
    sink.start()
    try:
        sink.send(score(0))
        assert wait_until(lambda: sink.stats()["dropped"] == 1)
        assert sink.stats()["errors"] == 1
        blocker.unlink()
        time.sleep(0.1)  # past the first retry delay
        sink.send(score(1))
        assert wait_until(lambda: sink.stats()["sent"] == 1)
    finally:
        sink.stop()
    assert [line["index"] for line in read_jsonl([path])] == [1]
    assert sink.stats()["errors"] == 1


def test_an_event_that_cannot_be_encoded_is_counted(tmp_path):
    class Broken(RecordScored):
        def to_dict(self):
            raise TypeError("no dict for you")

    stats = run_sink(JsonlSink(Options(path=str(tmp_path / "s.jsonl"))), [Broken(**vars(score(0))), score(1)])
    assert stats["errors"] == 1 and stats["dropped"] == 1 and stats["sent"] == 1


# ---------------------------------------------------------------------------- options and registry


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"path": ""}, "path: expected a file path"),
        ({"path": "/x/{device}.jsonl"}, r"path: unknown placeholder \{device\}"),
        ({"path": "/x/{stream.jsonl"}, "path: .*literal brace"),
        ({"events": "all"}, "events: expected one of scores, alerts, both, got 'all'"),
        ({"max_bytes": -1}, "max_bytes: expected an integer >= 0, got -1"),
        ({"keep": 1.5}, "keep: expected an integer >= 0"),
        ({"flush_seconds": -0.1}, "flush_seconds: expected a number >= 0"),
        ({"queue_events": 0}, "queue_events: expected an integer >= 1"),
        ({"fsync": "yes"}, "fsync: expected true or false"),
    ],
)
def test_bad_options_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        Options(**{"path": "/tmp/s.jsonl", **changes})


def test_registry_builds_both_sinks_and_the_stream_name_fills_the_path(tmp_path):
    jsonl = make_sink("jsonl", {"path": str(tmp_path / "{stream}.jsonl")}, name="mqtt/temps")
    csv_sink = make_sink("csv", {"path": str(tmp_path / "{stream}.csv"), "fsync": True}, name="uart0")
    assert isinstance(jsonl, JsonlSink) and isinstance(csv_sink, CsvSink)
    assert jsonl.path == tmp_path / "mqtt_temps.jsonl"  # no sub-directory smuggled in by a name
    run_sink(csv_sink, [score(0)])
    assert (tmp_path / "uart0.csv").read_text().count("\n") == 2
