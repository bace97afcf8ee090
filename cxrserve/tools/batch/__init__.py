"""``cxrserve batch``: score a folder, a glob or a CSV of paths; one output row per input.

    cxrserve batch studies/ --model cxr-triage --out triage.csv               # REST
    cxrserve batch 'scans/**/*.dcm' --model cxr-pxs --out pxs.jsonl --grpc   # gRPC
    cxrserve batch list.csv --model cxr-triage --out t.csv --in-process model_store/cxr-triage.mar
    cxrserve batch studies/ --model cxr-study --out study.csv   # a composed model: <key>_<field> columns

Guarantees:

* **one row per input**, a result or an error with its HTTP status and message; files
  that cannot be read or decoded get a row too;
* **resume**: rerunning the same command skips inputs that already have a final row
  (a result or a 4xx), re-scores those that failed for transient reasons (connection,
  5xx), and never writes a second row for an input; rows are appended and flushed one
  by one, a torn last line from a kill is cut off on resume;
* **no identifiers in clear**: a DICOM input is keyed by a hash of its SOP Instance UID
  (one row per SOP instance: a second file holding the same instance is reported as a
  duplicate), and its path is written as a hash unless ``--dicom-paths clear``;
* bounded concurrency (``--concurrency`` requests in flight), a tqdm progress bar, and a
  summary (counts, errors by kind, throughput) printed and saved as
  ``<out>.summary.json``.

Backends: REST, gRPC or a KServe v2 endpoint through :class:`cxrserve.tools.client.CXRClient`, or in-process through
:func:`cxrserve.core.loading.load_pipeline` (same pipeline code as the TorchServe handlers,
no server needed). The transient-failure policy: the client retries 503/507 and
connection errors; on top, a request that still fails with a 5xx is tried again up to
``--attempts`` times (a worker that died mid-request is restarted by TorchServe).

One module per idea: :mod:`.inputs` (finding and keying the files), :mod:`.scorers`
(remote or in-process), :mod:`.rows` (a row's columns, a composed model's headlines),
:mod:`.writer` (the resumable rows file), :mod:`.dicom_out` (``--dicom-out``), :mod:`.run` (the driver and its summary),
:mod:`.cli` (the command). No DICOM value in rows or logs: :mod:`cxrserve.tools.privacy`.
"""
