"""cxrserve on KServe: the KServe-native predictor (``cxrserve kserve``) and the TorchServe runtime's layout.

The predictor loads each archive of a model store with
:func:`cxrserve.core.loading.load_pipeline`, wraps it in a ``kserve.Model`` and serves
them all with ``kserve.ModelServer``: the Open Inference Protocol (v2) over REST and
gRPC, without TorchServe.

==================================  ==============================================================
``GET /v2/health/live``, ``ready``  server live / ready (no auth: probes)
``GET /v2``                         server metadata
``GET /v2/models/<m>[/ready]``      model metadata (inputs: ``image``, extra images, one optional
                                    input per option with its v2 datatype) / model ready
``GET /v2/models/<m>/config``       the pipeline's description: options with defaults and help,
                                    component cards, input gate (tritonclient ``get_model_config``)
``POST /v2/models/<m>/infer``       one study (see :mod:`.protocol`); answer: output ``response``,
                                    the model's JSON response as text (the body TorchServe answers)
``GET /metrics``                    Prometheus: the SDK's request latencies plus ``cxrserve_*``
==================================  ==============================================================

One module per idea, each importing only those below it in this list:

* :mod:`.cli`: ``cxrserve kserve``, which puts the others together;
* :mod:`.server`: the SDK's ModelServer with cxrserve's REST routes and gRPC servicer;
* :mod:`.auth`: ``--token-file`` bearer tokens for REST and gRPC;
* :mod:`.model`: one pipeline as a ``kserve.Model``;
* :mod:`.batcher`: concurrent requests gathered into one ``pipeline.predict``;
* :mod:`.metrics`: the ``cxrserve_*`` Prometheus metrics;
* :mod:`.protocol`: v2 requests to studies, model inputs, error statuses and gRPC codes;
* :mod:`.repository`: a store's models, archives unpacked once, their TorchServe settings.

Beside the predictor, :mod:`.torchserve_runtime` lays the store out for KServe's own
*TorchServe* runtime instead (``python -m cxrserve.tools.kserve.torchserve_runtime``,
``deploy/kserve/``), reading each archive's model config as :mod:`.repository` does.
"""
