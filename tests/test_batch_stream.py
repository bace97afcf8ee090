"""``cxrserve batch`` streams its inputs: a huge list is never read or held at once."""
from __future__ import annotations

import json
import threading

from cxrserve.tools.batch.inputs import iter_inputs
from cxrserve.tools.batch.rows import make_row
from cxrserve.tools.batch.run import run_batch


class CountingScorer:
    """Answers every input at once, recording how far the input stream had been read."""

    def __init__(self, pulled: list[int]):
        self.pulled, self.seen = pulled, []
        self.lock = threading.Lock()

    def __call__(self, item):
        with self.lock:
            self.seen.append(self.pulled[0])
        return make_row(item, status=200, result={"model": "stub", "score": 0.5, "blob": "x" * 1000})


def test_inputs_are_pulled_as_slots_free_up(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for i in range(300):
        (folder / f"{i:04d}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(8))
    pulled = [0]

    def stream():
        for path in iter_inputs([folder]):
            pulled[0] += 1
            yield path

    scorer = CountingScorer(pulled)
    out = tmp_path / "rows.jsonl"
    summary = run_batch(stream(), out, scorer=scorer, concurrency=2, progress=False, root=folder)
    assert summary.total == summary.scored == summary.ok == 300
    # When the first request ran, only the first few inputs had been read (2 x concurrency
    # queued at most), not the 300.
    assert scorer.seen[0] <= 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 300 and len({r["input_id"] for r in rows}) == 300
    report = json.loads((tmp_path / "rows.jsonl.summary.json").read_text())
    assert report["throughput_per_s"] > 0 and report["peak_rss_mb"] > 0 and report["concurrency"] == 2
    # Resume keeps only keys, not results: a rerun finds everything done, scores nothing.
    again = run_batch(iter_inputs([folder]), out, scorer=scorer, concurrency=2, progress=False, root=folder)
    assert again.already_done == 300 and again.scored == 0


def test_iter_inputs_matches_sorted_rglob_order(tmp_path):
    for rel in ("b/2.png", "a/1.png", "a.png", "a-b.png", "c/d/3.dcm", ".hidden"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    expected = [p for p in sorted(tmp_path.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    assert list(iter_inputs([tmp_path, tmp_path / "a.png"])) == expected
