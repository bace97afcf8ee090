"""How ``cxrserve batch`` scores an input: over a served endpoint, or with a pipeline in this process.

The transient-failure policy: the client retries 503/507 and connection errors; on top,
a request that still fails with a 5xx is tried again up to ``attempts`` times (a worker
that died mid-request is restarted by TorchServe).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

from cxrserve.tools.batch.dicom_out import write_dicom_results
from cxrserve.tools.batch.inputs import BatchInput
from cxrserve.tools.batch.messages_out import write_messages
from cxrserve.tools.batch.rows import make_row


class RemoteScorer:
    """Score one input over REST or gRPC (thread-safe)."""

    def __init__(self, client, model: str, options: dict, attempts: int = 3, dicom_out: Path | None = None,
                 hl7_out: Path | None = None, fhir_out: Path | None = None):
        self.client, self.model, self.options, self.attempts = client, model, options, attempts
        self.dicom_out, self.hl7_out, self.fhir_out = dicom_out, hl7_out, fhir_out

    def __call__(self, item: BatchInput) -> dict:
        from cxrserve.tools.client import AuthenticationError, CXRServeError, InputRejected

        start = time.perf_counter()
        try:
            data = item.path.read_bytes()
        except OSError as err:
            return make_row(item, status=400, error="unreadable", message=f"cannot read file: {err.strerror}")
        last: Exception | None = None
        for attempt in range(self.attempts):
            try:
                result = self.client.predict(self.model, data, options=self.options)
                write_dicom_results(item, data, result, self.dicom_out)
                write_messages(item, data, result, self.hl7_out, self.fhir_out)
                return make_row(item, status=200, result=result, seconds=time.perf_counter() - start)
            except InputRejected as err:
                return make_row(item, status=err.status, error=err.code, message=err.message,
                                seconds=time.perf_counter() - start)
            except AuthenticationError:
                raise  # every input would fail the same way: stop the run
            except CXRServeError as err:  # 5xx or unavailable after the client's own retries
                last = err
                time.sleep(min(8.0, 0.5 * 2**attempt))
        status = getattr(last, "status", 0) or 0
        return make_row(item, status=status if status >= 500 else 503,
                        error=getattr(last, "code", "error"), message=getattr(last, "message", "no answer"),
                        seconds=time.perf_counter() - start)


class InProcessScorer:
    """Score chunks of inputs with a pipeline loaded in this process (no server)."""

    def __init__(self, pipeline, options: dict, dicom_out: Path | None = None, hl7_out: Path | None = None,
                 fhir_out: Path | None = None):
        self.pipeline, self.options, self.dicom_out = pipeline, options, dicom_out
        self.hl7_out, self.fhir_out = hl7_out, fhir_out
        self.lock = threading.Lock()  # one forward pass at a time; threads overlap file reading

    def score_many(self, items: list[BatchInput]) -> list[dict]:
        from cxrserve.core.errors import CXRInputError

        start = time.perf_counter()
        prepared, rows, read = [], {}, []
        for i, item in enumerate(items):
            try:
                read.append((i, item.path.read_bytes()))
            except OSError as err:
                rows[i] = make_row(item, status=400, error="unreadable", message=f"cannot read file: {err.strerror}")
        if hasattr(self.pipeline, "make_items"):  # cxr-study: the chunk's files decoded in parallel
            decoded = self.pipeline.make_items([({"image": data}, self.options) for _, data in read])
        else:
            decoded = []
            for _, data in read:
                try:
                    decoded.append(self.pipeline.make_item({"image": data}, self.options))
                except CXRInputError as err:
                    decoded.append(err)
        for (i, _), entry in zip(read, decoded):
            if isinstance(entry, CXRInputError):
                rows[i] = make_row(items[i], status=entry.status, error=entry.code, message=entry.message)
            else:
                prepared.append((i, entry))
        if prepared:
            with self.lock:
                outputs = self.pipeline.predict([p for _, p in prepared])
                self.pipeline.timer.reset()
            each = (time.perf_counter() - start) / max(1, len(items))
            for (i, _), out in zip(prepared, outputs):
                if isinstance(out, CXRInputError):
                    rows[i] = make_row(items[i], status=out.status, error=out.code, message=out.message, seconds=each)
                else:
                    write_dicom_results(items[i], dict(read)[i], out, self.dicom_out)
                    write_messages(items[i], dict(read)[i], out, self.hl7_out, self.fhir_out)
                    rows[i] = make_row(items[i], status=200, result=out, seconds=each)
        return [rows[i] for i in range(len(items))]
