"""``cxrserve bench``: how fast cxrserve scores studies, against the seeds' way and the hardware.

One command (``make bench``) prints a markdown table and writes JSON + markdown to
``benchmarks/results/``. For every served model in the store it measures, on the same
inputs and in the same run:

* **naive**: the seed's way -- eager PyTorch modules rebuilt from the store's own
  checkpoints (``<work>/checkpoints/<component>/best.ckpt``), one image at a time in a
  Python loop, Grad-CAM by an autograd backward pass (as the seeds compute heatmaps),
  the same decoder and the same named preprocessing. Every ratio is against this row.
* **in-process**: :func:`cxrserve.core.loading.load_pipeline` with batching, on ONNX Runtime
  and TorchScript (the backend a store does not ship is exported from the checkpoint
  into a cache beside it, once);
* **TorchServe**: the store served end to end over REST and gRPC, at several numbers
  of concurrent clients, and for the sweep model (the registry's first served model)
  at several batch sizes;
* **ceiling**: the forward passes alone (input gate and every component) at their
  best batch size, on preprocessed tensors.

Each row has throughput (studies/s), latency p50/p99, CPU use (CPU seconds per wall
second of the processes doing the work: 2.0 = both cores of a 2-core machine busy),
peak RSS, the ratio to the naive baseline, the share of the ceiling and the largest
difference of the model's main scores from the naive outputs (the "same outputs"
check). Further sections: decode time per DICOM transfer syntax, preprocessing step
costs, per-stage timings of each pipeline, and how latency and memory grow with image
size, batch size, PXS pool size and concurrent clients.

Measurements are only as good as the machine is quiet: the load average is recorded
before and after, with the CPU model, core count and library versions. Without a GPU
the suite says so and measures the CPU; with ``--device cuda`` the pipelines, the naive
baseline and TorchServe's workers (``number_of_gpu``) run on the GPU and ONNX Runtime
asks for its CUDA provider.

Every case stops after ``--requests`` studies or ``--seconds`` seconds, whichever comes
first, and the case length shrinks when the whole run would exceed ``--budget``, so
the default configuration finishes in under 10 minutes on a 2-core CPU machine.
"""

