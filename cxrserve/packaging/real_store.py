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
5. holds every component to the minimum bars of :mod:`cxrserve.packaging.acceptance` on that
   split (``store.acceptance`` in the recipe): the gate first, before the archives are built
   (its threshold is set where it refuses at most 2 % of validation frontal films; a gate that
   then fails is left out of every archive), then each model from its evaluation. Archives are
   built in ``WORK/staging`` and only an archive whose every component passed is copied into the
   store; a failing one keeps the store's previous accepted version (``acceptance.json`` in the
   store) or is left out. The build then raises :class:`AcceptanceFailed` naming each failed bar
   (the CLI exits 3), so a budget-starved build never looks like a finished one;
6. writes ``WORK/MODEL_CARD_real.md``, a model-card fragment generated from those JSON
   files only: the acceptance table (bar, value with interval, pass/fail, what shipped) and
   each value with its 95 % interval where measured and the issue-15 target beside it (each
   family's ``real_store`` targets, :func:`targets`).

Weights trained on ``../shared/data`` must never be committed (CATALOG.md): the store
and work folders are build outputs.
"""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict

import yaml
from pathlib import Path
from typing import Iterable

from cxrserve import families
from cxrserve.packaging.real_card import GATE, card_fragment, loso_section
from cxrserve.packaging.real_eval import checkpoint_card, cut_validation, evaluate_archive
from cxrserve.packaging.store import DONE, StoreBuilder, mark_trained
from cxrserve.training.recipes import META_KEYS, task_settings

log = logging.getLogger(__name__)


REAL_WARNING = ("REAL-DATA MODEL (real, {version}): trained by `cxrserve store build --data` on {trained_on}. "
                "Research use only, not a medical device; its validation numbers (and the targets they miss) "
                "are in the store's model-card fragment")

class RealStoreBuilder(StoreBuilder):
    """:class:`StoreBuilder` whose components are trained on real data instead of phantoms."""

    def __init__(self, store: str | Path, work: str | Path, *, data: Iterable[str | Path],
                 recipe: str | Path | None = None, sources: list[str] | None = None, budget: float | None = None,
                 checkpoints: dict[str, str] | None = None, device: str = "auto", eval_device: str = "cpu",
                 max_eval: int | None = None, progress: bool = True):
        # archives are built in a staging folder; only accepted ones reach the store (promote)
        super().__init__(Path(work) / "staging", work, checkpoints=checkpoints, progress=progress, device=device)
        self.final_store = Path(store)
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
        from cxrserve.packaging import acceptance

        acceptance_cfg = self.cfg.get("acceptance") or {}
        self.bars = acceptance.load_bars(acceptance_cfg)
        self.gate_settings = acceptance.gate_settings(acceptance_cfg)
        self.classifiers = acceptance.classifiers(acceptance_cfg)
        self.gate_verdict = None  # acceptance.Verdict of the gate, once judged
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
        if GATE in self._planned:  # its threshold (or its absence) goes into every archive
            self.accept_gate()
        return [self.archive(n) for n in names]

    # ----------------------------------------------------------------- acceptance
    def evaluators(self, names: Iterable[str]) -> list[str]:
        """``names`` plus the archives that evaluate the components they carry (cxr-triage carries
        lungseg, judged through cxr-lungseg), so every shipped component has been judged."""
        out = list(names)
        carried = {c for n in out for c in self.archive_components(n) if c != GATE}
        for name, served in self.archives.items():
            if not served.compose and served.components and served.components[-1] in carried and name not in out:
                out.append(name)
        return out

    def accept_gate(self):
        """Score the exported gate on its validation split and on held-out phantoms of other kinds, set
        its threshold (:func:`acceptance.gate_threshold`) and judge it: a failing gate is left out of
        every archive (enforced nowhere), a passing one ships with that threshold in its card."""
        import shutil

        import torch

        from cxrserve.core.card import ModelCard
        from cxrserve.core.imageio import read_file
        from cxrserve.core.runtime import load_runtime
        from cxrserve.core.transforms import build_transform
        from cxrserve.packaging import acceptance
        from cxrserve.synthetic.phantoms import write_dataset
        from cxrserve.training.common import load_records, split

        task = families.get_task(self.components_cfg[GATE]["task"])  # its truth: task.gate_label
        self.leave_out.discard(GATE)
        ckpt = self.checkpoint(GATE)
        card = checkpoint_card(ckpt)
        folder = self.component(GATE)  # scored as served: the exported model, its preprocessing
        runtime = load_runtime(folder, "torchscript", torch.device(self.eval_device))
        meta = ModelCard.load(folder / "metadata.json")
        transform = build_transform(meta.preprocessing)
        frontal_index = list(meta.labels).index(task.FRONTAL)

        def scores(records) -> list[float]:
            out = []
            for start in range(0, len(records), 64):
                inputs = [transform(read_file(r.path).uint8) for r in records[start : start + 64]]
                out += [float(o[0][frontal_index]) for o in runtime.run_chunked(inputs, 64)]
            return out

        # the gate's own validation split, drawn again as its training drew it (data + phantom negatives)
        cfg = self.components_cfg.get(GATE, {})
        records = self.records() + (load_records(self.negatives(GATE, cfg["negatives"])) if cfg.get("negatives") else [])
        sp = card.extra.get("split", {})
        _, val = split(records, float(sp.get("val_fraction", 0.2)), int(sp.get("seed", 0)))
        val = cut_validation(val, card, None)
        frontal = [r for r in val if task.gate_label(r) == task.FRONTAL]
        other = [r for r in val if task.gate_label(r) != task.FRONTAL]
        # phantoms of other kinds, from a seed its training never drew
        g = self.gate_settings
        root = self.work / "phantoms" / "gate_acceptance"
        if not (root / "labels.csv").exists():
            tmp = root.with_name(root.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            write_dataset(tmp, int(g["phantoms_per_kind"]) * len(g["kinds"]), seed=int(g["phantom_seed"]),
                          kinds=tuple(g["kinds"]), height=int(g["phantom_size"]), width=int(g["phantom_size"]))
            tmp.replace(root)
        phantoms = load_records(root)
        by_kind: dict[str, list[float]] = defaultdict(list)
        for r, s in zip(phantoms, scores(phantoms)):
            by_kind[r.extras.get("kind") or r.label].append(s)
        # a resumed build starts again from the trained threshold, not from the one it set
        trained = float(card.extra.get("acceptance", {}).get("trained_threshold", card.thresholds.get("accept", 0.5)))
        cap = next((b.bound for b in self.bars if b.name == "gate_frontal_refused"), 0.02)
        evidence = acceptance.gate_evidence(scores(frontal), scores(other), by_kind, trained, cap)
        evidence.update(archive="input gate (every archive)", version=card.version, trained_on=card.trained_on,
                        validation_method=f"the gate's patient split (val_fraction={sp.get('val_fraction')}, "
                                          f"seed={sp.get('seed', 0)}) and {len(phantoms)} phantoms of other kinds "
                                          f"(seed {g['phantom_seed']}), scored by the exported gate",
                        validation_n=len(val))
        verdict = acceptance.judge(evidence, self.bars)
        evidence["verdict"] = verdict.to_dict()
        out = self.work / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "gate.json").write_text(json.dumps(evidence, indent=2, sort_keys=True, default=str) + "\n")
        threshold = evidence["threshold"]
        if verdict.passed and abs(threshold - float(card.thresholds.get("accept", 0.5))) > 1e-9:
            if GATE in self.given:  # a --checkpoint file is the user's: the threshold goes on a copy
                copy = self.work / "checkpoints" / "gate-accepted" / "best.ckpt"
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ckpt, copy)
                ckpt = self.given[GATE] = copy
            self._set_gate_threshold(ckpt, evidence)
        if not verdict.passed:
            log.warning("the gate missed its acceptance bars, no archive carries it: %s", "; ".join(verdict.failures))
            self.leave_out.add(GATE)
        self.gate_verdict = verdict
        return verdict

    def _set_gate_threshold(self, ckpt: Path, evidence: dict) -> None:
        """The accepted threshold goes into the gate's card (what serving reads), the trained one beside it."""
        import torch

        from cxrserve.core.card import ModelCard
        from cxrserve.models.checkpoint import load_checkpoint

        payload = load_checkpoint(ckpt)
        card = ModelCard.from_dict(payload["card"])
        card.extra["acceptance"] = {
            "trained_threshold": evidence["trained_threshold"], "threshold": evidence["threshold"],
            "rule": "the trained threshold, lowered until at most the bar's share of validation frontal films "
                    "scores below it", "frontal_refused": evidence["frontal"]["refused_rate"]}
        card.thresholds["accept"] = evidence["threshold"]
        payload["card"] = card.to_dict()
        tmp = ckpt.with_suffix(".ckpt.tmp")
        torch.save(payload, tmp)
        tmp.replace(ckpt)
        log.info("gate threshold set to %.4f on its validation split", evidence["threshold"])

    def promote(self, names: Iterable[str], verdicts: dict) -> dict[str, dict]:
        """Copy each archive whose every component passed (``verdicts``: component -> Verdict) from
        staging into the store; for one that did not, keep the store's previous accepted version or
        remove what the store holds under its name (never accepted). Returns ``{archive: {"shipped":
        "this build" | "previous" | None, "reasons": [...]}}``; ``<store>/acceptance.json`` lists the
        accepted archives."""
        import shutil

        record_path = self.final_store / "acceptance.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        self.final_store.mkdir(parents=True, exist_ok=True)
        decisions: dict[str, dict] = {}
        for name in names:
            reasons = []
            for component in self.archive_components(name):  # a composed model: every family's
                if component != GATE:  # a failing gate is left out of the archive, not a reason to hold it
                    verdict = verdicts.get(component)
                    reasons += verdict.failures if verdict else [f"{component}: not evaluated by this build"]
            mar = self.final_store / f"{name}.mar"
            if not reasons:
                tmp = mar.with_name(f".{mar.name}.partial")
                shutil.copy2(self.store / f"{name}.mar", tmp)
                tmp.replace(mar)
                st = mar.stat()
                record[name] = {"version": self.version, "accepted": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "size": st.st_size, "mtime_ns": st.st_mtime_ns}
                decisions[name] = {"shipped": "this build", "reasons": []}
                continue
            prev = record.get(name)
            if prev and mar.exists() and (mar.stat().st_size, mar.stat().st_mtime_ns) == (prev["size"], prev["mtime_ns"]):
                decisions[name] = {"shipped": "previous", "previous": prev, "reasons": reasons}
                continue
            if mar.exists():
                log.warning("removing %s from the store: it was never accepted", mar)
                mar.unlink()
            record.pop(name, None)
            decisions[name] = {"shipped": None, "reasons": reasons}
        record_path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return decisions

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


class AcceptanceFailed(RuntimeError):
    """A real build whose components missed acceptance bars: ``failures`` names each failed bar,
    ``archives`` what was shipped anyway (the passing ones), ``fragment`` the card that says why."""

    def __init__(self, failures: list[str], archives: list[Path], fragment: Path, decisions: dict[str, dict]):
        self.failures, self.archives, self.fragment, self.decisions = failures, archives, fragment, decisions
        held = [n for n, d in decisions.items() if d["shipped"] != "this build"]
        super().__init__(f"{len(failures)} acceptance bar(s) failed; not shipped from this build: "
                         f"{', '.join(held) or 'none'}:\n" + "\n".join(f"  - {f}" for f in failures))


def build_real_store(store, work, data, *, recipe=None, only=None, budget=None, sources=None, device="auto",
                     eval_device="cpu", max_eval=None, checkpoints=None, progress=True) -> tuple[list[Path], Path]:
    """Train, mark real, export, archive, evaluate, judge, ship what passed and write the card fragment;
    returns (shipped archives, fragment), or raises :class:`AcceptanceFailed` after shipping what passed."""
    from cxrserve.packaging import acceptance

    builder = RealStoreBuilder(store, work, data=data, recipe=recipe, sources=sources, budget=budget,
                               checkpoints=checkpoints, device=device, eval_device=eval_device, max_eval=max_eval,
                               progress=progress)
    names = list(only or builder.archives)
    judged = builder.evaluators(names)
    builder.build(judged)
    results = builder.evaluate([n for n in judged if not builder.archives[n].compose])  # each model once
    verdicts = {GATE: builder.gate_verdict} if builder.gate_verdict is not None else {}
    for name, result in results.items():
        verdict = acceptance.judge(result, builder.bars)
        verdicts[verdict.component] = verdict
        result["verdict"] = verdict.to_dict()
        (builder.work / "eval" / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    decisions = builder.promote(names, verdicts)
    gate = json.loads((builder.work / "eval" / "gate.json").read_text()) if GATE in verdicts else None
    fragment = Path(work) / "MODEL_CARD_real.md"
    fragment.write_text(card_fragment(results, verdicts, decisions, gate) + "\n" + loso_section(work))
    shipped = [builder.final_store / f"{n}.mar" for n, d in decisions.items() if d["shipped"]]
    carried = {c for n in names for c in families.archive_components(n)}  # the gate too, even left out
    failures = [line for component, verdict in verdicts.items() if component in carried for line in verdict.failures]
    if failures or any(d["shipped"] != "this build" for d in decisions.values()):
        raise AcceptanceFailed(failures, shipped, fragment, decisions)
    return shipped, fragment


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
        import sys

        from cxrserve.core.options import parse_pairs

        try:
            archives, fragment = build_real_store(
                args.store, args.work, args.data, recipe=args.recipe or "real",
                only=args.only, budget=args.budget, sources=args.sources, device=args.device,
                eval_device=args.eval_device, max_eval=args.max_eval,
                checkpoints=parse_pairs(args.checkpoint, "NAME=PATH"))
        except AcceptanceFailed as failed:  # what passed is shipped; the exit status says the rest did not
            for path in failed.archives:
                print(f"{path}  ({path.stat().st_size / 2**20:.0f} MiB)")
            print(f"model-card fragment: {failed.fragment}")
            print(f"cxrserve store build: {failed}", file=sys.stderr)
            return 3
        for path in archives:
            print(f"{path}  ({path.stat().st_size / 2**20:.0f} MiB)")
        print(f"model-card fragment: {fragment}")
        return 0

    p.set_defaults(func=cmd_store)
