"""The naive baseline: the seeds' way of running the *same* pipeline.

Every ratio in the benchmark is against this. It is the served pipeline class itself
(same decoder, header screen, input gate, preprocessing and response logic), with what
the seeds did differently swapped in, and nothing else:

* each component is the eager ``nn.Module`` rebuilt from the store's checkpoint (no
  exported graph);
* one study at a time (batch of one), each request decoding its own file;
* pictures by autograd, as the seeds draw them: for the components a family lists in
  ``Served.gradcam`` the classifier runs with gradients and back-propagates each class's
  logit, reading the last conv block's activations and gradients through hooks
  (Grad-CAM); severity's saliency is already an input gradient in the pipeline.

What the seeds also do only once is done once here: loading weights, the PXS pool's
embeddings and CheXzero's label text embeddings (the pipeline's ``setup``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cxrserve import families
from cxrserve.core.errors import CXRInputError
from cxrserve.core.runtime import Runtime, TorchRuntime
from cxrserve.models.checkpoint import load_model


class GradCamRuntime(Runtime):
    """``(probabilities, cams)`` like the exported classifier, the cams by autograd Grad-CAM."""

    backend = "eager-gradcam"

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module = module.to(device).eval()
        self.device = device

    def __call__(self, batch: torch.Tensor) -> tuple[np.ndarray, ...]:
        model, seen = self.module, {}

        def keep(_module, _inputs, output):
            seen["activations"] = output
            output.register_hook(lambda grad: seen.__setitem__("gradients", grad))

        handle = model.features.register_forward_hook(keep)
        cams = []
        try:
            with torch.enable_grad():
                x = batch.to(self.device)
                logits = model.logits(x)
                for c in range(logits.shape[1]):
                    model.zero_grad(set_to_none=True)
                    logits[:, c].sum().backward(retain_graph=c + 1 < logits.shape[1])
                    weights = seen["gradients"].mean(dim=(2, 3), keepdim=True)
                    cams.append(torch.relu((weights * seen["activations"]).sum(dim=1)).detach())
        finally:
            handle.remove()
        probs = torch.softmax(logits.detach(), dim=1)
        return probs.float().cpu().numpy(), torch.stack(cams, dim=1).float().cpu().numpy()


class NaiveBaseline:
    """``NaiveBaseline("cxr-triage", unpacked_archive, checkpoints).predict(file_bytes, options)``."""

    def __init__(self, name: str, model_dir: Path, checkpoints: dict[str, Path], device: str = "cpu",
                 pictures: bool = True):
        from cxrserve.core.loading import load_pipeline

        _, served = families.get_served(name)
        self.name = name
        self.device = torch.device(device)
        self.pipeline = load_pipeline(model_dir, device=device)
        self.pipeline.limits.max_batch = 1
        parts = dict(self.pipeline.parts)
        if self.pipeline.gate is not None:
            parts.setdefault("gate", self.pipeline.gate)
        self.same_weights: dict[str, bool] = {}
        for part, component in parts.items():
            path = checkpoints.get(part)
            if path is None or not Path(path).exists():
                raise FileNotFoundError(f"no checkpoint for component {part!r} ({path}): give --work or "
                                        f"--checkpoint {part}=PATH")
            module, card = load_model(path, self.device)
            # The card's creation time is stamped at training: equal cards, equal weights.
            self.same_weights[part] = (card.created, card.version) == (component.card.created, component.card.version)
            if pictures and part in served.gradcam:
                for p in module.parameters():  # as in the seeds' scripts, parameters carry gradients
                    p.requires_grad_(True)
                component.runtime = GradCamRuntime(module, self.device)
            else:
                component.runtime = TorchRuntime(module, self.device)

    def predict(self, data: bytes, options: dict | None = None) -> dict:
        item = self.pipeline.make_item({"image": data}, options or {})
        result = self.pipeline.predict([item])[0]
        if isinstance(result, CXRInputError):
            raise result
        return result
