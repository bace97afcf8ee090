"""Build the model store: phantoms -> demo training -> export -> ``.mar`` archives.

``cxrserve store build`` (what ``make store`` runs) reads the family registry
(:mod:`cxrserve.families`: each served model, its components and model config, each
component's demo training block) and the phantom data of ``training/demo.yaml``.
Every step is skipped when its output already exists,
so an interrupted build resumes and a second run is instant. Real weights replace the
demo ones by pointing ``--checkpoint NAME=PATH`` at a checkpoint trained with
``cxrserve train`` (the card then says what data it came from).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch
import yaml

from cxrserve import families
from cxrserve.packaging.export import ArchiveSpec, archive_files, build_archive, export_component
from cxrserve.training.recipes import STORE_KEYS

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
HANDLER = REPO / "handlers" / "cxrserve_handler.py"


#: Marker of a component whose training finished (``best.ckpt`` alone may be an interrupted run's).
DONE = "DONE"


def mark_trained(out: Path, info: dict) -> None:
    """Mark ``out`` finished and drop its resume checkpoints.

    ``last.ckpt`` (weights plus optimiser state, about 3x ``best.ckpt``) only serves to
    resume an interrupted run; a finished component is never resumed, and keeping them
    cost about 1 GB of the demo build's 1.7 GB. The marker goes first: a stop in between
    must not leave a component with neither a marker nor its resume file.
    """
    (out / DONE).write_text(json.dumps(info) + "\n")
    for resume_file in out.rglob("last.ckpt"):
        resume_file.unlink()


def _load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def resolve_model_config(config: dict) -> dict:
    """``deviceType: auto`` -> ``gpu`` when this machine has CUDA, else ``cpu``."""
    config = dict(config)
    if config.get("deviceType", "auto") == "auto":
        config["deviceType"] = "gpu" if torch.cuda.is_available() else "cpu"
    return config


def _digest(sources: list[Path], files: list[Path], text: str) -> str:
    """Content hash of source files, (size, mtime) of large artefacts, and extra text."""
    h = hashlib.sha256(text.encode())
    for path in sources:
        h.update(str(path.name).encode() + path.read_bytes())
    for path in files:
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


class StoreBuilder:
    def __init__(self, store: str | Path = "model_store", work: str | Path = "build", *,
                 recipe: str | Path | None = None, checkpoints: dict[str, str] | None = None,
                 progress: bool = True, device: str = "auto", leave_out: Iterable[str] = ()):
        self.store = Path(store)
        self.work = Path(work)
        self.recipe = _load_yaml(Path(recipe or REPO / "training" / "demo.yaml"))
        # A recipe may carry its own component blocks; otherwise the families' demo blocks.
        self.recipe.setdefault("components", families.recipe_components("demo"))
        self.archives = {name: served for name, (_, served) in families.served().items()}
        self.leave_out = set(leave_out)  # components not to ship (e.g. an archive without the gate)
        self.given = {k: Path(v) for k, v in (checkpoints or {}).items()}
        self.progress = progress
        self.device = device

    # ----------------------------------------------------------------- steps
    def phantom_set(self, name: str) -> Path:
        """Write phantom set ``name`` once: ``train``/``val`` or one under ``phantoms.sets``.

        A set's ``options`` go to :func:`cxrserve.synthetic.phantoms.write_dataset` (kinds,
        studies_per_patient, min_extent, ...); the recipe's ``height``/``width`` apply to all.
        """
        from cxrserve.synthetic.phantoms import write_dataset

        spec = self.recipe.get("phantoms", {})
        cfg = spec.get(name) if name in ("train", "val") else spec.get("sets", {}).get(name)
        if cfg is None:
            raise KeyError(f"phantom set {name!r} is not in the recipe")
        root = self.work / "phantoms" / name
        if not (root / "labels.csv").exists():
            t = time.time()
            tmp = root.with_name(root.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            options = {**spec.get("options", {}), **cfg.get("options", {})}
            write_dataset(tmp, cfg.get("n", 200), seed=cfg.get("seed", 0), height=spec.get("height", 384),
                          width=spec.get("width", 384), progress=self.progress, **options)
            tmp.replace(root)
            log.info("phantoms %s: %d images in %.0f s", name, cfg.get("n", 200), time.time() - t)
        return root

    def phantoms(self) -> dict[str, Path]:
        return {part: self.phantom_set(part) for part in ("train", "val")}

    def checkpoint(self, name: str) -> Path:
        """Train component ``name`` on phantoms unless a checkpoint was given or exists."""
        from cxrserve.families import get_task
        from cxrserve.training.common import load_records

        if name in self.given:
            return self.given[name]
        cfg = dict(self.recipe["components"][name])
        out = self.work / "checkpoints" / name
        best = out / "best.ckpt"
        if best.exists() and (out / DONE).exists():
            return best
        task = get_task(cfg["task"])
        depends = {arg: self.checkpoint(dep) for arg, dep in cfg.get("depends", {}).items()}
        records = load_records([self.phantom_set(part) for part in cfg.get("data", ["train", "val"])])
        settings = {k: v for k, v in cfg.items() if k not in STORE_KEYS}
        log.info("training demo component %s", name)
        started = time.time()
        task.train(records, out_dir=out, demo=True, version="0.1.0-demo", progress=self.progress,
                   device=self.device, resume=True, **depends, **settings)
        mark_trained(out, {"seconds": round(time.time() - started, 1), "task": cfg["task"]})
        return best

    def formats(self, component: str) -> tuple[str, ...]:
        """Export formats a component needs across the served models that ship it."""
        needed: set[str] = set()
        for name, served in self.archives.items():
            if component not in self.archive_components(name) or served.compose:
                continue  # a composed model (cxr-study) runs each component as its family's archive does
            needed.update(served.export_formats)
            needed.add(self.model_config(name).get("handler", {}).get("backend", "torchscript"))
            pipeline = families.pipeline_class(name)
            if component in pipeline.autograd_components:
                needed.add("torchscript")
        return tuple(f for f in ("torchscript", "onnx") if f in needed) or ("torchscript",)

    def archive_components(self, name: str) -> tuple[str, ...]:
        return tuple(c for c in families.archive_components(name) if c not in self.leave_out)

    def model_config(self, name: str) -> dict:
        family, served = families.get_served(name)
        return _load_yaml(family.model_config_path(served))

    def component(self, name: str) -> Path:
        ckpt = self.checkpoint(name)
        out = self.work / "components" / name
        formats = self.formats(name)
        fresh = (out / "metadata.json").exists() and (out / "metadata.json").stat().st_mtime >= ckpt.stat().st_mtime
        if fresh and all((out / f).exists() for f in (("model.pt",) if "torchscript" in formats else ())
                                                   + (("model.onnx",) if "onnx" in formats else ())):
            return out
        shutil.rmtree(out, ignore_errors=True)
        try:
            export_component(ckpt, out, formats=formats)
            self.post_export(name, out)
        except BaseException:
            # never leave a component that looks complete: the next build exports it again
            shutil.rmtree(out, ignore_errors=True)
            raise
        return out

    def post_export(self, name: str, folder: Path) -> None:
        """Task-specific artefacts that must travel with a component (reference pools, ...).

        The hook gets the component block's ``post_export`` settings.
        """
        from cxrserve.families import get_task

        cfg = self.recipe["components"].get(name, {})
        task = get_task(cfg.get("task", name)) if cfg else None
        hook = getattr(task, "post_export", None)
        if hook is not None:
            hook(folder, self, dict(cfg.get("post_export") or {}))

    def archive(self, name: str) -> Path:
        """Build ``<store>/<name>.mar`` unless one from the same inputs is already there.

        The inputs are the modules the archive ships (:func:`archive_files`), the handler,
        the model config and every component file, hashed into a digest kept beside the
        store: editing code rebuilds exactly the archives that carry it.
        """
        served = self.archives[name]
        mar = self.store / f"{name}.mar"
        components = {c: self.component(c) for c in self.archive_components(name)}
        model_config = resolve_model_config(self.model_config(name))
        if served.compose:  # cxr-study: each family's handler block travels inside it
            model_config = families.pipeline_class(name).archive_config(model_config, {
                other: self.model_config(other) for other, s in self.archives.items() if not s.compose})
        digest = _digest([*archive_files(served.pipeline, families.composed_pipelines(name)).values(), HANDLER],
                         [p for folder in components.values() for p in sorted(folder.rglob("*")) if p.is_file()],
                         repr(sorted(model_config.items())) + repr(served) + repr(sorted(components)))
        stamp = self.work / "archives" / f"{name}.digest"
        if mar.exists() and stamp.exists() and stamp.read_text() == digest:
            return mar
        path = build_archive(
            ArchiveSpec(name=name, pipeline_class=served.pipeline, handler=HANDLER, components=components,
                        model_config=model_config, version=served.version,
                        composed=families.composed_pipelines(name)),
            self.store,
        )
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
        return path

    def build(self, only: Iterable[str] | None = None) -> list[Path]:
        names = list(only or self.archives)
        unknown = [n for n in names if n not in self.archives]
        if unknown:
            raise KeyError(f"unknown archive(s) {unknown}; known: {sorted(self.archives)}")
        # Two builders on one work folder (`make store` and a test session started beside it)
        # would write the same partial phantom sets; the second waits for the first instead.
        self.work.mkdir(parents=True, exist_ok=True)
        with open(self.work / ".build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return [self.archive(n) for n in names]
