"""Decompression bombs against the served entry points (issue 25, finding 1), end to end.

A 300 MiB deflate bomb in a few hundred KB, and a JPEG DICOM whose header says 256 x 256
while its frame says 12000 x 12000: each is a 413 in well under a second over TorchServe
REST and gRPC and in ``cxrserve batch``, and the workers' peak memory (VmHWM, the
high-water mark the kernel keeps) does not move by more than a few tens of MB. Before
the bounded decoders the bomb was a 200 with +600 MB, the frame a 400 after decoding
144 Mpx.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from cxrserve.tools.client import CXRClient, InputRejected
from test_decode_bombs import MiB, deflate_bomb, jpeg_dicom, set_sof, with_frame

pytestmark = [pytest.mark.serve, pytest.mark.slow]
MODEL = "cxr-triage"


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    import numpy as np

    y, x = np.mgrid[0:256, 0:256]
    image = (40 + x // 2 + y // 3).clip(0, 255).astype(np.uint8)
    return {"deflate": deflate_bomb(300 * MiB),
            "jpeg_frame": with_frame(jpeg_dicom(image), set_sof(12000, 12000))}


def worker_peaks(workdir: Path) -> dict[int, int]:
    """VmHWM (kB) of every Python worker of this TorchServe (the fork server's children)."""
    import psutil

    from cxrserve.tools import server

    root = server.forkserver_pid(workdir)
    procs = psutil.Process(root).children(recursive=True) if root else []
    if not procs:  # TorchServe's own worker start: the frontend's Python children
        procs = [p for p in psutil.process_iter(["cmdline"]) if "model_service_worker" in " ".join(
            p.info["cmdline"] or [])]
    peaks = {}
    for proc in procs:
        try:
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[proc.pid] = int(line.split()[1])
        except OSError:
            continue
    return peaks


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_bombs_are_413_fast_without_a_memory_jump(served, bombs, protocol):
    url = served.inference if protocol == "rest" else f"127.0.0.1:{served.grpc_inference_port}"
    with CXRClient(url, protocol=protocol, key_file=served.workdir / "key_file.json", retries=0) as client:
        from test_client import phantom_png

        client.predict(MODEL, phantom_png(1))  # every worker warm: its peak from ordinary work is set
        before = worker_peaks(served.workdir)
        assert before, "no worker process found"
        for name, data in bombs.items():
            t0 = time.perf_counter()
            with pytest.raises(InputRejected) as info:
                client.predict(MODEL, data)
            elapsed = time.perf_counter() - t0
            assert info.value.status == 413, (name, info.value.status, info.value.message)
            assert elapsed < 2.0, f"{name}: refused after {elapsed:.2f} s"
            print(f"{protocol} {name}: 413 in {elapsed * 1000:.0f} ms")
        after = worker_peaks(served.workdir)
    rises = {pid: (after[pid] - before[pid]) / 1024 for pid in before if pid in after}
    print(f"{protocol} worker peak rises (MB): {rises}")
    assert max(rises.values()) < 48, rises


def test_batch_gives_each_bomb_a_413_row(bombs, tmp_path, pipeline):
    import json

    from cxrserve.tools.batch.run import run_batch
    from cxrserve.tools.batch.scorers import InProcessScorer

    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in bombs.items():
        (folder / f"{name}.dcm").write_bytes(data)
    out = tmp_path / "rows.jsonl"
    t0 = time.perf_counter()
    run_batch(sorted(folder.iterdir()), out, in_process=InProcessScorer(pipeline(MODEL), {}), root=folder,
              progress=False)
    assert time.perf_counter() - t0 < 10
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r.get("status") == 413 for r in rows), rows
