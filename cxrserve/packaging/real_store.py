"""One command from a data folder to a real model store.

``cxrserve store build --recipe real --data DIR [--budget SECONDS]``
(``make real-store DATA=DIR``) does, for the archives asked for (default: every served
model of the registry):

1. trains every component they need in dependency order (``lungseg`` before
   ``triage_classifier``, ``pxs_pretrain`` before ``pxs``) with the recipe's section for
   its task (the same sections ``cxrserve train NAME --recipe training/real.yaml`` reads),
   on CPU or GPU (``--device``). A component whose ``real_store`` block asks for
   ``negatives`` (the gate) also gets phantom laterals, other body parts and photographs. Resumable: a
   component with a finished ``best.ckpt`` (``DONE`` marker) is not retrained, an
   interrupted one resumes from its ``last.ckpt``. ``--budget`` seconds bound the
   training: each component gets a share of what is left (``store.budget_weights``)
   as its ``deadline`` (``train(deadline=...)``, :class:`FitConfig`): no epoch starts that
   would end after it, and the best checkpoint so far is kept.
2. marks every card ``real``: version ``<store.version>`` (contains ``real``) and a
   ``REAL-DATA MODEL`` warning instead of the demo one, so every response's
   ``model_version`` and ``warnings`` say ``real``;
3. exports the components and builds the ``.mar`` archives (:class:`StoreBuilder`);
4. evaluates each archive, in process through the served pipeline, on the
   patient-level validation split its training held out (rebuilt from the split
   settings in its card with the task's ``training_split`` or the same split call),
   with the task's ``evaluate``; writes ``WORK/eval/<archive>.json``;
5. writes ``WORK/MODEL_CARD_real.md``, a model-card fragment generated from those JSON
   files only: each value with its 95 % interval where measured and the issue-15 target
   beside it (each family's ``real_store`` targets, :func:`targets`).

Weights trained on ``../shared/data`` must never be committed (CATALOG.md): the store
and work folders are build outputs.
"""
from __future__ import annotations

import inspect
import json
import logging
import re
import time
from collections import defaultdict

import yaml
from pathlib import Path
from typing import Iterable

from cxrserve import families
from cxrserve.packaging.store import DONE, StoreBuilder, mark_trained
from cxrserve.training.recipes import META_KEYS, task_settings

log = logging.getLogger(__name__)

REAL_WARNING = ("REAL-DATA MODEL (real, {version}): trained by `cxrserve store build --data` on {trained_on}. "
                "Research use only, not a medical device; its validation numbers (and the targets they miss) "
                "are in the store's model-card fragment")

def targets() -> list[tuple[str, str, float, str, str]]:
    """Each family's real-data targets (``real_store.<component>.targets`` in its recipes):
    ``(archive, what, target, "min" | "max", regex over the flattened evaluation JSON keys)``."""
    out = []
    for name, (_, served) in families.served().items():
        if not served.components:  # a composed model (cxr-study) has no model of its own to score
            continue
        block = families.recipe_components("real_store").get(served.components[-1]) or {}
        out += [(name, t["what"], float(t["target"]), t["sense"], t["key"]) for t in block.get("targets", [])]
    return out


class RealStoreBuilder(StoreBuilder):
    """:class:`StoreBuilder` whose components are trained on real data instead of phantoms."""

    def __init__(self, store: str | Path, work: str | Path, *, data: Iterable[str | Path],
                 recipe: str | Path | None = None, sources: list[str] | None = None, budget: float | None = None,
                 checkpoints: dict[str, str] | None = None, device: str = "auto", eval_device: str = "cpu",
                 max_eval: int | None = None, progress: bool = True):
        super().__init__(store, work, checkpoints=checkpoints, progress=progress, device=device)
        self.data = [Path(d) for d in data]
        self.sources = sources
        # "real": every family's real blocks; a YAML file: task blocks of the same shape plus `store:`
        self.recipe_name = str(recipe or "real")
        file_cfg = {} if self.recipe_name == "real" else yaml.safe_load(Path(recipe).read_text()) or {}
        self.cfg = dict(file_cfg.get("store") or {})
        self.task_blocks = {k: v for k, v in file_cfg.items() if k not in ("store",)}
        self.task_blocks = {**{t: task_settings("real", t) for t in families.tasks()}, **self.task_blocks}
        version = str(self.cfg.get("version", "0.2.0-real"))
        self.version = version if "real" in version else f"{version}-real"
        # components from the registry: task and dependencies (demo blocks), how a real store
        # assembles them (each family's real_store blocks), and the recipe file's overrides
        assembly = families.recipe_components("real_store")
        self.components_cfg = {
            name: {"task": block["task"], "depends": dict(block.get("depends") or {}), **(assembly.get(name) or {}),
                   **(self.cfg.get("components", {}).get(name) or {})}
            for name, block in families.recipe_components("demo").items()}
        self.weights = {name: float(c.get("budget_weight", 1.0)) for name, c in self.components_cfg.items()}
        self.weights.update(self.cfg.get("budget_weights") or {})
        self.budget = budget
        self.started = time.time()
        self.eval_device = eval_device
        self.max_eval = max_eval
        self._records = None
        self._planned: list[str] = []

    # ----------------------------------------------------------------- data
    def records(self):
        from cxrserve.training.common import load_records

        if self._records is None:
            self._records = load_records(self.data, sources=self.sources)
            if not self._records:
                raise ValueError(f"no records in {[str(d) for d in self.data]}")
        return self._records

    def negatives(self, name: str, spec: dict) -> Path:
        """Phantom non-CXRs for a component that needs them (the gate; real collections hold few)."""
        from cxrserve.synthetic.phantoms import write_dataset

        root = self.work / "phantoms" / f"{name}_negatives"
        if not (root / "labels.csv").exists():
            tmp = root.with_name(root.name + ".partial")
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            write_dataset(tmp, int(spec["n"]), seed=int(spec["seed"]), kinds=tuple(spec["kinds"]),
                          height=int(spec["size"]), width=int(spec["size"]), progress=self.progress)
            tmp.replace(root)
        return root

    # ----------------------------------------------------------------- training
    def plan(self, archives: Iterable[str]) -> list[str]:
        """Components the archives need, dependencies first."""
        order: list[str] = []

        def visit(name: str) -> None:
            if name in order:
                return
            for dep in self.components_cfg[name].get("depends", {}).values():
                visit(dep)
            order.append(name)

        for archive in archives:
            for component in self.archive_components(archive):
                visit(component)
        return order

    def _deadline(self, name: str) -> float | None:
        if not self.budget:
            return None
        left = self.started + float(self.budget) - time.time()
        todo = [c for c in self._planned if c not in self.given
                and not (self.work / "checkpoints" / c / DONE).exists()] or [name]
        share = self.weights.get(name, 1.0) / sum(self.weights.get(c, 1.0) for c in todo)
        if left <= 0:
            log.warning("budget spent before %s: it trains its first epoch only", name)
        return time.time() + max(0.0, left) * share

    def checkpoint(self, name: str) -> Path:
        from cxrserve.families import get_task
        from cxrserve.training.common import load_records

        if name in self.given:
            return self.given[name]
        cfg = self.components_cfg[name]
        out = self.work / "checkpoints" / name
        best, done = out / "best.ckpt", out / DONE
        if best.exists() and done.exists():
            return best
        task_name = cfg["task"]
        task = get_task(task_name)
        depends = {arg: str(self.checkpoint(dep)) for arg, dep in cfg.get("depends", {}).items()}
        settings = {k: v for k, v in (self.task_blocks.get(task_name) or {}).items() if k not in META_KEYS}
        kwargs = {**settings, **(cfg.get("args") or {})}
        records = self.records()
        if cfg.get("negatives"):
            records = records + load_records(self.negatives(name, cfg["negatives"]))
        deadline = self._deadline(name)
        started = time.time()
        log.info("training real component %s (task %s) on %d records%s", name, task_name, len(records),
                 f", deadline in {deadline - started:.0f} s" if deadline else "")
        task.train(records, out_dir=out, demo=False, version=self.version, progress=self.progress,
                   device=self.device, resume=True, deadline=deadline, **depends, **kwargs)
        self._mark_real(best)
        mark_trained(out, {"seconds": round(time.time() - started, 1), "task": task_name})
        return best

    def _mark_real(self, ckpt: Path) -> None:
        """Card says ``real`` in its version and warnings (what every response reports)."""
        import torch

        from cxrserve.core.card import ModelCard
        from cxrserve.models.checkpoint import load_checkpoint

        payload = load_checkpoint(ckpt)  # weights_only: a --checkpoint path is the user's
        card = ModelCard.from_dict(payload["card"])
        card.demo = False
        card.version = self.version
        card.extra["warnings"] = [REAL_WARNING.format(version=self.version, trained_on=card.trained_on or "real data")]
        card.extra["built_by"] = "cxrserve store build --data"
        payload["card"] = card.to_dict()
        tmp = ckpt.with_suffix(".ckpt.tmp")
        torch.save(payload, tmp)
        tmp.replace(ckpt)

    def post_export(self, name: str, folder: Path) -> None:
        """The task's store hook, told where the real data is (PXS: its reference pool's normal films)."""
        cfg = self.components_cfg.get(name)
        if cfg is None:
            return
        hook = getattr(families.get_task(cfg["task"]), "post_export", None)
        if hook is not None:
            hook(folder, self, {**dict(cfg.get("post_export") or {}), "data": [str(d) for d in self.data]})

    def build(self, only: Iterable[str] | None = None) -> list[Path]:
        names = list(only or self.archives)
        unknown = [n for n in names if n not in self.archives]
        if unknown:
            raise KeyError(f"unknown archive(s) {unknown}; known: {sorted(self.archives)}")
        self._planned = self.plan(names)
        for component in self._planned:  # dependency order, one at a time
            self.checkpoint(component)
        return [self.archive(n) for n in names]

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, archives: Iterable[str]) -> dict[str, dict]:
        results = {}
        out = self.work / "eval"
        out.mkdir(parents=True, exist_ok=True)
        for name in archives:
            result = evaluate_archive(self, name)
            (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
            results[name] = result
        return results


# --------------------------------------------------------------------------- evaluation
def _card(ckpt: Path):
    from cxrserve.core.card import ModelCard
    from cxrserve.models.checkpoint import load_checkpoint

    return ModelCard.from_dict(load_checkpoint(ckpt)["card"])


def _numbers(metrics: dict) -> dict:
    """The JSON-ready part of a card's metrics (best epoch on its validation split)."""
    from cxrserve.training.metrics import to_jsonable

    return to_jsonable({k: v for k, v in (metrics or {}).items() if not k.startswith("_")})


def _cut(records, card, limit):
    want = card.extra.get("split", {}).get("val")
    records = list(records)[:want] if want is not None and want < len(records) else list(records)
    return records[:limit] if limit else records


def evaluate_archive(builder: RealStoreBuilder, name: str) -> dict:
    """Served-pipeline metrics on the archive's own patient-level validation split."""
    from cxrserve.core.pipeline import load_pipeline
    from cxrserve.families import get_task

    # the archive's own model: its last component before the shared gate (cxr-triage: the classifier)
    main = families.get_served(name)[1].components[-1]  # composed models are not evaluated here
    card = _card(builder.checkpoint(main))
    sp = card.extra.get("split", {})
    result = {"archive": name, "component": main, "version": card.version, "trained_on": card.trained_on,
              "split": sp, "training_validation": _numbers(card.metrics)}
    records = builder.records()
    task = get_task(builder.components_cfg[main]["task"])
    vf, seed = sp.get("val_fraction"), sp.get("seed", 0)
    val = None
    if hasattr(task, "training_split") and vf is not None:
        # split settings beyond the fraction and seed (mortality's test_fraction, PXS's target) as recorded
        accepted = inspect.signature(task.training_split).parameters
        extra = {k: v for k, v in sp.items() if k in accepted and k not in ("val_fraction", "seed", "records")}
        _, val = task.training_split(records, val_fraction=vf, seed=seed, **extra)
        method = f"{task.__name__}.training_split(val_fraction={vf}, seed={seed})"
    else:
        method = "training-time validation only (see training_validation)"
    result["validation_method"] = method
    if val is not None:
        val = _cut(val, card, builder.max_eval)
        pipeline = load_pipeline(builder.store / f"{name}.mar", device=builder.eval_device)
        result["validation"] = task.evaluate(pipeline, val)
        result["validation_n"] = len(val)
    return result


# --------------------------------------------------------------------------- card fragment
def _flatten(obj, prefix: str = "") -> dict[str, object]:
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = obj
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _interval(flat: dict, key: str) -> str:
    sibling = key.rsplit(".", 1)[0] + ".ci95"  # {"auc": x, "ci95": [lo, hi]} (zero-shot's per-label rows)
    for name in (key + "_ci95", key + "_ci", sibling):
        ci = flat.get(name)
        if ci is None:
            low, high = flat.get(f"{name}.low"), flat.get(f"{name}.high")
            ci = [low, high] if low is not None else None
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and None not in ci:
            return f" ({float(ci[0]):.2f}-{float(ci[1]):.2f})"
    return ""


def card_fragment(results: dict[str, dict]) -> str:
    """Markdown generated from the evaluation JSON alone (no number is typed by hand)."""
    lines = ["# Real store: validation numbers (generated by `cxrserve store build --data`)", "",
             "Every value is read from the archive's evaluation JSON (`eval/<archive>.json`): rows without "
             "'best epoch' were measured through the served pipeline on the patient-level validation split its "
             "training held out; 'best epoch' rows are the training's own evaluation of that split (eager "
             "model, the epoch kept). Targets are issue 15's.",
             ""]
    for name, result in results.items():
        flat = {k: v for k, v in _flatten(result).items()}
        lines += [f"## {name}", "", f"version `{result.get('version')}`, trained on {result.get('trained_on')}; "
                  f"validation: {result.get('validation_method')}, n = {result.get('validation_n', '-')}"
                  + (f", refused by the input checks or gate: {flat['validation.rejected']}"
                     if flat.get("validation.rejected") else ""), "",
                  "| metric | value (95 % CI) | target | met |", "|---|---|---|---|"]
        rows = 0
        for archive, what, target, sense, pattern in targets():
            if archive != name:
                continue
            for key, value in flat.items():
                m = re.search(pattern, key)
                if not m or isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
                    continue
                label = what.format(**m.groupdict())
                if value is None:  # the key exists but nothing could be scored (e.g. every film refused)
                    lines.append(f"| {label} | not measured (no scorable films) | "
                                 f"{'>=' if sense == 'min' else '<='} {target:g} | - |")
                    rows += 1
                    continue
                met = value >= target if sense == "min" else value <= target
                lines.append(f"| {label} | {_fmt(float(value))}{_interval(flat, key)} | "
                             f"{'>=' if sense == 'min' else '<='} {target:g} | {'yes' if met else 'no'} |")
                rows += 1
        if not rows:
            for _, what, target, sense, _ in [t for t in targets() if t[0] == name]:
                lines.append(f"| {what.format_map(defaultdict(lambda: 'every one'))} | not measured by this build | "
                             f"{'>=' if sense == 'min' else '<='} {target:g} | - |")
        numbers = {k: v for k, v in flat.items() if k.startswith("training_validation.") and k.count(".") == 1
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            lines += ["", "Best epoch on the training's own validation split: "
                      + ", ".join(f"{k.split('.', 1)[1]} {_fmt(v)}" for k, v in sorted(numbers.items()))]
        lines.append("")
    return "\n".join(lines)


def build_real_store(store, work, data, *, recipe=None, only=None, budget=None, sources=None, device="auto",
                     eval_device="cpu", max_eval=None, checkpoints=None, progress=True) -> tuple[list[Path], Path]:
    """Train, mark real, export, archive, evaluate and write the card fragment; returns (archives, fragment)."""
    builder = RealStoreBuilder(store, work, data=data, recipe=recipe, sources=sources, budget=budget,
                               checkpoints=checkpoints, device=device, eval_device=eval_device, max_eval=max_eval,
                               progress=progress)
    names = list(only or builder.archives)
    archives = builder.build(names)
    results = builder.evaluate([n for n in names if not builder.archives[n].compose])  # each model once
    fragment = Path(work) / "MODEL_CARD_real.md"
    fragment.write_text(card_fragment(results) + "\n")
    return archives, fragment


# --------------------------------------------------------------------------- CLI
def register_cli(sub) -> None:
    """Extend ``cxrserve store build`` with ``--data`` (real store) and its options."""
    p = sub.choices.get("store")
    if p is None:
        return
    p.add_argument("--data", nargs="+", help="build a REAL store: train every component on these folders "
                                             "(labels.csv folders or a data root) with --recipe training/real.yaml")
    p.add_argument("--sources", nargs="+", help="with --data: only these source folders")
    p.add_argument("--budget", type=float, help="with --data: training time budget in seconds (whole build)")
    p.add_argument("--eval-device", default="cpu", help="with --data: device for the served-pipeline evaluation")
    p.add_argument("--max-eval", type=int, help="with --data: cap on validation images per archive")
    demo_build = p.get_default("func")

    def cmd_store(args) -> int:
        if not args.data:
            return demo_build(args)
        from cxrserve.core.options import parse_pairs

        archives, fragment = build_real_store(
            args.store, args.work, args.data, recipe=args.recipe or "real",
            only=args.only, budget=args.budget, sources=args.sources, device=args.device,
            eval_device=args.eval_device, max_eval=args.max_eval, checkpoints=parse_pairs(args.checkpoint, "NAME=PATH"))
        for path in archives:
            print(f"{path}  ({path.stat().st_size / 2**20:.0f} MiB)")
        print(f"model-card fragment: {fragment}")
        return 0

    p.set_defaults(func=cmd_store)
