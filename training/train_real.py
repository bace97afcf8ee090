"""Train, export and evaluate every model family on the real data, in one run (GPU or CPU).

Usage (from the repository root; ``python`` = the project's interpreter)::

    python training/train_real.py DATA OUT [FAMILY ...] [--device cuda] [--budget 540]
    # e.g. on a GPU machine:  python training/train_real.py ../shared/data /tmp/real --device cuda
    # CPU smoke test:         python training/train_real.py .gpu_data /tmp/smoke --device cpu \\
    #     --sources ieee8023_jun2020 openist_normal_lungmasks --set epochs=1 steps_per_epoch=2 \\
    #     --pxs-folds 2 --pool-max-images 8 --zeroshot-arch vit-demo --max-eval 16

FAMILY is any of ``lungseg triage severity mortality pxs zeroshot`` (default: all). Each
family trains with ``training/real.yaml`` through ``cxrserve train`` (triage on the crops
of the lung U-Net trained first; PXS = ``pxs_pretrain``, then ``cxrserve pxs crossval``
on the 73 severity-scored images), is exported the way its archive serves it (backend of
``export/model-config/<archive>.yaml``) into an unpacked pipeline folder (no
torch-model-archiver needed), and is scored through the served pipeline **on the exact
held-out split its training used**, rebuilt here from the split settings in its card
(``cxrserve eval --split val`` re-splits all records, so it would score training images).

Independent chains run in parallel (``lungseg -> triage``, ``severity``, ``mortality``,
``pxs_pretrain -> pxs crossval``, ``zeroshot``): training is bound by Python-side image
preparation, so one GPU serves several at once. ``--budget`` seconds bound the whole run:
each training step gets a deadline (``$CXRSERVE_TRAIN_DEADLINE``: no epoch starts that
would end after it; the best checkpoint so far is kept and post-training steps still
run), and anything still running near the end is stopped so the summary is written.

Pipelines are scored on CPU by default (``--eval-device``), as the default model-configs
serve them. The zero-shot tokenizer needs ``open_clip_torch`` (and ``ftfy``, ``wcwidth``):
carry their wheels to a GPU machine that lacks them.

Writes ``OUT/results/*.json`` (metrics, cards, histories), ``OUT/logs/*.log``,
``OUT/summary.json`` and ``OUT/summary.md``. Checkpoints and exported models stay under
``OUT/runs`` and ``OUT/models``: weights trained on real data are never committed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "training" / "real.yaml"
FAMILIES = ("lungseg", "triage", "severity", "mortality", "pxs", "zeroshot")
#: Chains of steps that depend on each other; chains run in parallel.
CHAINS = (("lungseg", "triage"), ("severity",), ("mortality",), ("pxs",), ("zeroshot",))
#: Training deadline per training step, as a fraction of --budget from the start.
DEADLINES = {"lungseg": 0.30, "triage": 0.75, "severity": 0.50, "mortality": 0.75, "pxs_pretrain": 0.25,
             "pxs_crossval": 0.85, "zeroshot": 0.72}
#: Served archive, pipeline components (archive component -> run folder) per family.
ARCHIVES = {
    "lungseg": ("cxr-lungseg", {"lungseg": "lungseg"}),
    "triage": ("cxr-triage", {"lungseg": "lungseg", "triage_classifier": "triage"}),
    "severity": ("cxr-severity", {"severity": "severity"}),
    "mortality": ("cxr-mortality", {"mortality": "mortality"}),
}


# --------------------------------------------------------------------------- orchestration
class Runner:
    def __init__(self, args):
        self.args = args
        self.data = [str(Path(d).resolve()) for d in args.data]
        self.out = Path(args.out).resolve()
        self.start = time.time()
        self.failed: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        for sub in ("runs", "models", "results", "logs"):
            (self.out / sub).mkdir(parents=True, exist_ok=True)

    def say(self, msg: str) -> None:
        print(f"[{time.time() - self.start:6.0f} s] {msg}", flush=True)

    def overrides(self, family: str) -> list[str]:
        """``--set`` values for one training step: ``KEY=V`` for all, ``FAMILY.KEY=V`` for one."""
        out = []
        for item in self.args.set or []:
            key, _, value = item.partition("=")
            scope, dot, name = key.rpartition(".")
            if not dot:
                out.append(item)
            elif scope == family:
                out.append(f"{name}={value}")
        return out

    def run(self, name: str, cmd: list[str], deadline: float | None = None) -> bool:
        """Run one step as a subprocess (log in OUT/logs/NAME.log); False when it failed."""
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
        if deadline is not None:
            deadline = float(self.args.deadlines.get(name.removeprefix("train_"), deadline))
            env["CXRSERVE_TRAIN_DEADLINE"] = str(self.start + deadline * self.args.budget)
        log = self.out / "logs" / f"{name}.log"
        t = time.time()
        self.say(f"start {name}: {' '.join(cmd[2:])}")
        with open(log, "a") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            with self.lock:
                self.procs.add(proc)
            rc = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        took = time.time() - t
        self.timings[name] = round(took, 1)
        if rc != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            self.failed[name] = f"exit {rc}: " + " | ".join(tail)
            self.say(f"FAILED {name} after {took:.0f} s (exit {rc}); see logs/{name}.log: {' | '.join(tail)[-400:]}")
            return False
        self.say(f"done {name} in {took:.0f} s")
        return True

    def train(self, task: str, family: str, extra: list[str] = ()) -> bool:
        cmd = [sys.executable, "-m", "cxrserve", "train", task, "--data", *self.data, "--recipe", str(RECIPE),
               "--out", str(self.out / "runs" / task), "--device", self.args.device]
        if self.args.sources:
            cmd += ["--sources", *self.args.sources]
        sets = list(extra) + self.overrides(family)
        if sets:
            cmd += ["--set", *sets]
        return self.run(f"train_{task}", cmd, DEADLINES.get(task))

    def evaluate(self, family: str) -> bool:
        cmd = [sys.executable, str(Path(__file__).resolve()), "_evaluate", family, *self.data, "--out", str(self.out),
               "--device", self.args.eval_device, "--max-eval", str(self.args.max_eval)]
        if self.args.sources:
            cmd += ["--sources", *self.args.sources]
        return self.run(f"eval_{family}", cmd)

    def family(self, family: str) -> bool:
        runs = self.out / "runs"
        if family == "lungseg":
            return self.train("lungseg", family) and self.evaluate(family)
        if family == "triage":
            seg = runs / "lungseg" / "best.ckpt"
            if not seg.exists():
                self.failed["train_triage"] = "no lung segmentation checkpoint"
                return False
            return self.train("triage", family, [f"segmentation={seg}"]) and self.evaluate(family)
        if family in ("severity", "mortality"):
            return self.train(family, family) and self.evaluate(family)
        if family == "zeroshot":
            return self.train("zeroshot", family, [f"arch={self.args.zeroshot_arch}"]) and self.evaluate(family)
        if family == "pxs":
            if not self.train("pxs_pretrain", "pxs_pretrain"):
                return False
            cmd = [sys.executable, "-m", "cxrserve", "pxs", "crossval", "--data", *self.data, "--pool-data",
                   *self.pool_data(), "--out", str(runs / "pxs_crossval"), "--recipe", str(RECIPE),
                   "--folds", str(self.args.pxs_folds), "--pool-max-images", str(self.args.pool_max_images),
                   "--device", self.args.device, "--set", f"pretrained={runs / 'pxs_pretrain' / 'best.ckpt'}",
                   *self.overrides("pxs")]
            if self.args.sources:
                cmd[cmd.index("--pool-data"):cmd.index("--pool-data")] = ["--sources", *self.args.sources]
            return self.run("pxs_crossval", cmd, DEADLINES["pxs_crossval"]) and self.evaluate(family)
        raise KeyError(family)

    def pool_data(self) -> list[str]:
        """Normal films for the PXS reference pools: the clean adult PA normals (OpenIST)."""
        for root in self.data:
            folder = Path(root) / "openist_normal_lungmasks"
            if folder.is_dir():
                return [str(folder)]
        return self.data

    def chain(self, families: list[str]) -> None:
        for family in families:
            if not self.family(family):
                self.say(f"chain {'->'.join(families)} stops at {family}")
                return

    def main(self) -> int:
        wanted = list(self.args.families or FAMILIES)
        chains = [[f for f in chain if f in wanted] for chain in CHAINS]
        threads = [threading.Thread(target=self.chain, args=(c,), daemon=True) for c in chains if c]
        for t in threads:
            t.start()
        stop_at = self.start + self.args.budget
        for t in threads:
            t.join(timeout=max(0.0, stop_at - time.time()))
        if any(t.is_alive() for t in threads):
            self.say("budget spent: stopping the steps still running")
            with self.lock:
                for proc in list(self.procs):
                    proc.terminate()
            for t in threads:
                t.join(timeout=20)
        summary = summarize(self.out, wanted, self.failed, self.timings, time.time() - self.start, self.args)
        text = summary_markdown(summary)
        (self.out / "summary.md").write_text(text)
        print(text, flush=True)
        return 0 if not self.failed else 1


# --------------------------------------------------------------------------- evaluation
def _load(data, sources):
    from cxrserve.tasks.common import load_records

    return load_records(data, sources=sources)


def _card(ckpt: Path):
    from cxrserve.card import ModelCard
    from cxrserve.checkpoint import load_checkpoint

    return ModelCard.from_dict(load_checkpoint(ckpt, "cpu")["card"])


def _check(name: str, val: list, card) -> list:
    """The rebuilt validation split, cut to the card's count as ``max_val`` cut it in training."""
    want = card.extra.get("split", {}).get("val")
    if want is None or len(val) == want:
        return val
    if want < len(val):  # training kept val_set[:max_val]
        return val[:want]
    raise RuntimeError(f"{name}: rebuilt validation split has {len(val)} images, training used {want}")


def model_folder(out: Path, archive: str, components: dict[str, Path]) -> Path:
    """An unpacked ``archive`` (pipeline.json + exported components), as the store would ship it."""
    import yaml

    from cxrserve.export import export_component
    from cxrserve.store import StoreBuilder

    folder = out / "models" / archive
    builder = StoreBuilder(out / "models" / "_store", out / "models" / "_work", progress=False)
    for component, ckpt in components.items():
        if not (folder / component / "metadata.json").exists():
            export_component(ckpt, folder / component, formats=builder.formats(component))
    config = yaml.safe_load((REPO / "export" / "model-config" / f"{archive}.yaml").read_text())
    spec = builder.archives[archive]
    (folder / "pipeline.json").write_text(json.dumps({"pipeline": spec.get("pipeline", archive), "name": archive,
                                                      "version": "real", "handler": config.get("handler", {})}))
    return folder


def _groups(records):
    from cxrserve.datasets import patient_groups

    return patient_groups(records)


def _cap(records, n):
    return list(records)[:n] if n else list(records)


def eval_lungseg(args, out: Path) -> dict:
    import numpy as np

    from cxrserve.metrics import bootstrap_ci, dice
    from cxrserve.lungs import mask_to_image_size
    from cxrserve.pipeline import load_pipeline
    from cxrserve.tasks.common import ImageCache, split
    from cxrserve.tasks.lungseg import dice_by_source
    from cxrserve.triage import find_lungs

    ckpt = out / "runs" / "lungseg" / "best.ckpt"
    card = _card(ckpt)
    sp = card.extra["split"]
    records = _load(args.data, args.sources)
    usable = [r for r in records if r.mask_path is not None and r.is_frontal is not False]
    _, val = split(usable, sp["val_fraction"], sp["seed"], stratify=lambda r: r.source)
    val = _check("lungseg", val, card)
    val = _cap(val, args.max_eval)
    pipeline = load_pipeline(model_folder(out, "cxr-lungseg", {"lungseg": ckpt}), device=args.device)
    cache = ImageCache(max_side=None)
    seg = pipeline.parts["lungseg"]
    findings = find_lungs([cache.image(r) for r in val], seg.runtime, seg.card.preprocessing, seg.card.thresholds,
                          pipeline.limits.max_batch)
    threshold = seg.card.thresholds.get("mask", 0.5)
    report = dice_by_source(val, [f.probability for f in findings], cache, threshold)
    per = []
    for r, f in zip(val, findings):
        truth = cache.mask(r)
        per.append(dice(mask_to_image_size(f.probability, (truth.shape[1], truth.shape[0]), threshold), truth))
    ci = bootstrap_ci(lambda d: float(np.mean(d)), np.array(per), groups=_groups(val))
    report["dice_ci95"] = [ci["low"], ci["high"]]
    report["crop_rate"] = float(np.mean([f.crop_used for f in findings]))
    report["split"] = {"train": sp["train"], "val": sp["val"], "val_fraction": sp["val_fraction"],
                       "seed": sp["seed"], "stratify": "source"}
    return report


def _triage_predictions(pipeline, records):
    from cxrserve.imageio import read_file
    from cxrserve.pipeline import Item

    predicted = []
    for start in range(0, len(records), 16):
        chunk = records[start : start + 16]
        items = [Item(xray=read_file(r.path), options=pipeline.parse_options({})) for r in chunk]
        predicted += [out["label"] if isinstance(out, dict) else "rejected" for out in pipeline.predict(items)]
    return predicted


def _classification(records, predicted) -> dict:
    import numpy as np

    from cxrserve.datasets import CLASS_LABELS
    from cxrserve.metrics import bootstrap_ci, confusion_matrix, per_class_report
    from cxrserve.tasks.triage import classification_report

    report = classification_report(records, predicted)
    truth = np.array([r.triage_label for r in records], dtype=object)
    pred = np.array(predicted, dtype=object)
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        def metric(t, p, key=key):
            return per_class_report(confusion_matrix(list(t), list(p), list(CLASS_LABELS)), list(CLASS_LABELS))[key]
        ci = bootstrap_ci(metric, truth, pred, n=1000, groups=_groups(records))
        report[f"{key}_ci95"] = [ci["low"], ci["high"]]
    return report


def eval_triage(args, out: Path) -> dict:
    from cxrserve.pipeline import load_pipeline
    from cxrserve.tasks.common import split
    from cxrserve.tasks.triage import usable_records

    seg, clf = out / "runs" / "lungseg" / "best.ckpt", out / "runs" / "triage" / "best.ckpt"
    card = _card(clf)
    sp = card.extra["split"]
    records = _load(args.data, args.sources)
    _, val = split(usable_records(records), sp["val_fraction"], sp["seed"])
    val = _check("triage", val, card)
    val = _cap(val, args.max_eval)
    pipeline = load_pipeline(model_folder(out, "cxr-triage", {"lungseg": seg, "triage_classifier": clf}),
                             device=args.device)
    report = {"validation": _classification(val, _triage_predictions(pipeline, val)),
              "split": {"train": sp["train"], "val": sp["val"], "val_fraction": sp["val_fraction"],
                        "seed": sp["seed"]}, "crop_rate_train_val": card.extra.get("crop_rate")}
    # Never trained on: the paediatric Kermany films (viral pneumonia -> pneumonia).
    kids = _cap([r for r in records if "kermany" in r.source and r.triage_label is not None], args.max_eval)
    if kids:
        report["kermany_paediatric_external"] = _classification(kids, _triage_predictions(pipeline, kids))
    return report


def eval_severity(args, out: Path) -> dict:
    from cxrserve.pipeline import load_pipeline
    from cxrserve.tasks import severity

    ckpt = out / "runs" / "severity" / "best.ckpt"
    card = _card(ckpt)
    records = _load(args.data, args.sources)
    scored = _cap([r for r in records if severity.is_scored(r)], args.max_eval)
    pipeline = load_pipeline(model_folder(out, "cxr-severity", {"severity": ckpt}), device=args.device)
    served = severity.evaluate(pipeline, scored)
    served["note"] = "in-sample: the linear maps were fitted on these same scored images; see table1 for held-out"
    return {"table1": card.metrics.get("table1"), "served_on_scored_images": served,
            "pretraining": card.extra.get("pretraining"), "score_maps": card.extra.get("score_maps"),
            "fit_on_training_images": card.extra.get("fit", {}).get("on_training_images"),
            "best_epoch": {k: v for k, v in card.metrics.items() if k not in ("table1",)}}


def eval_mortality(args, out: Path) -> dict:
    from cxrserve.datasets import patient_split
    from cxrserve.pipeline import load_pipeline
    from cxrserve.tasks import mortality

    ckpt = out / "runs" / "mortality" / "best.ckpt"
    card = _card(ckpt)
    sp = card.extra["split"]
    records = _load(args.data, args.sources)
    parts = patient_split(mortality.usable_records(records), val_fraction=sp["val_fraction"],
                          test_fraction=sp["test_fraction"], seed=sp["seed"], stratify=lambda r: r.survival)
    parts["val"] = _check("mortality", parts["val"], card)
    pipeline = load_pipeline(model_folder(out, "cxr-mortality", {"mortality": ckpt}), device=args.device)
    report = {"split": sp, "data_summary": card.extra.get("data_summary"),
              "calibration": card.extra.get("calibration"), "threshold": card.thresholds.get("high_risk"),
              "initialised_from": card.extra.get("initialised_from"),
              "card_metrics": card.metrics}
    for part in ("test", "val"):
        if parts.get(part):
            report[f"served_{part}"] = mortality.evaluate(pipeline, _cap(parts[part], args.max_eval))
    report["served_val"]["note"] = "calibration and threshold were fitted on these images (optimistic)"
    return report


def eval_pxs(args, out: Path) -> dict:
    runs = out / "runs"
    cv = json.loads((runs / "pxs_crossval" / "crossval.json").read_text())
    pre = _card(runs / "pxs_pretrain" / "best.ckpt")
    folds = []
    for k in range(cv.get("folds", 0)):
        history = runs / "pxs_crossval" / f"fold_{k}" / "train" / "history.json"
        if history.exists():
            folds.append({"fold": k, "epochs": len(json.loads(history.read_text()))})
    return {"crossval": cv, "pretrain": {"metrics": pre.metrics, "split": pre.extra.get("split")}, "folds": folds}


def eval_zeroshot(args, out: Path) -> dict:
    from cxrserve.pipeline import load_pipeline
    from cxrserve.tasks import zeroshot
    from cxrserve.tasks.common import split
    from cxrserve.zeroshot import export_model_folder

    ckpt = out / "runs" / "zeroshot" / "best.ckpt"
    card = _card(ckpt)
    sp = card.extra["split"]
    records = _load(args.data, args.sources)
    _, val = split(zeroshot.usable_records(records), sp["val_fraction"], sp["seed"])
    val = _check("zeroshot", val, card)
    folder = out / "models" / "cxr-zeroshot"
    if not (folder / "pipeline.json").exists():
        export_model_folder(ckpt, folder, formats=("onnx",))
    pipeline = load_pipeline(folder, device=args.device)
    report = {"served_validation": zeroshot.evaluate(pipeline, _cap(val, args.max_eval)),
              "arch": card.extra.get("arch"), "split": sp, "best_epoch": card.metrics}
    eager = out / "runs" / "zeroshot" / "eval.json"
    if eager.exists():
        report["eager_validation"] = json.loads(eager.read_text())
    return report


EVALUATORS = {"lungseg": eval_lungseg, "triage": eval_triage, "severity": eval_severity,
              "mortality": eval_mortality, "pxs": eval_pxs, "zeroshot": eval_zeroshot}
HISTORIES = {"lungseg": ["lungseg"], "triage": ["triage"], "severity": ["severity"],
             "mortality": ["mortality", "mortality/pretrain"], "pxs": ["pxs_pretrain"], "zeroshot": ["zeroshot"]}


def evaluate_main(argv) -> int:
    import logging

    from cxrserve.metrics import to_jsonable

    p = argparse.ArgumentParser(prog="train_real.py _evaluate")
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("data", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--sources", nargs="+")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-eval", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    t = time.time()
    report = EVALUATORS[args.family](args, out)
    report["eval_seconds"] = round(time.time() - t, 1)
    report["histories"] = {}
    for run in HISTORIES[args.family]:
        history = out / "runs" / run / "history.json"
        if history.exists():
            report["histories"][run] = json.loads(history.read_text())
    (out / "results" / f"{args.family}.json").write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------- summary
def _fmt(x, nd=3):
    return "n/a" if x is None else f"{x:.{nd}f}"


def _ci(pair, nd=2):
    return "" if not pair or pair[0] is None else f" [{pair[0]:.{nd}f}, {pair[1]:.{nd}f}]"


def summarize(out: Path, wanted, failed, timings, seconds, args) -> dict:
    import platform

    results = {}
    for family in wanted:
        path = out / "results" / f"{family}.json"
        results[family] = json.loads(path.read_text()) if path.exists() else None
    device = None
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    except Exception:  # noqa: BLE001 - the summary must be written whatever happens
        pass
    summary = {"seconds": round(seconds, 1), "device": device, "budget": args.budget, "timings": timings,
               "failed": failed, "results": {k: v is not None for k, v in results.items()},
               "args": {k: v for k, v in vars(args).items() if k != "func"}}
    summary["lines"] = summary_lines(results)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def summary_lines(results: dict) -> list[str]:
    lines = []
    r = results.get("lungseg")
    if r:
        by = ", ".join(f"{s} {v['dice']:.3f} (n={v['n']})" for s, v in r["by_source"].items())
        lines.append(f"lungseg: val Dice {_fmt(r['dice'])}{_ci(r.get('dice_ci95'), 3)} on {r['n']} images ({by}); "
                     f"{len(r['histories'].get('lungseg', []))} epochs")
    r = results.get("triage")
    if r:
        v = r["validation"]
        sens = ", ".join(f"{c} sens {_fmt(p['sensitivity'], 2)} / PPV {_fmt(p['ppv'], 2)}"
                         for c, p in v["per_class"].items())
        lines.append(f"triage: val n={v['n']} accuracy {_fmt(v['accuracy'])}{_ci(v.get('accuracy_ci95'))}, "
                     f"macro-F1 {_fmt(v['macro_f1'])}{_ci(v.get('macro_f1_ci95'))}; {sens}; "
                     f"{len(r['histories'].get('triage', []))} epochs")
        for s, b in v["by_source"].items():
            lines.append(f"  triage {s}: n={b['n']} accuracy {_fmt(b['accuracy'])}, cm {b['confusion_matrix']}")
        k = r.get("kermany_paediatric_external")
        if k:
            lines.append(f"  triage Kermany (paediatric, never trained on): n={k['n']} accuracy {_fmt(k['accuracy'])}, "
                         f"cm {k['confusion_matrix']}")
    r = results.get("severity")
    if r and r.get("table1"):
        t1 = r["table1"]
        for score, rows in t1["scores"].items():
            cells = ", ".join(f"{row} MAE {v['mae']['mean']:.2f} r {v['pearson']['mean']:.2f}" for row, v in rows.items())
            lines.append(f"severity {score} ({t1['n_images']} images, {t1['n_splits']} splits): {cells}")
        auc = r.get("best_epoch", {}).get("val_auc", {})
        lines.append("severity pre-training val AUC: " + ", ".join(f"{k} {v:.2f}" for k, v in auc.items()))
    r = results.get("mortality")
    if r and r.get("served_test"):
        t = r["served_test"]
        lines.append("mortality test: " + json.dumps({k: v for k, v in t.items() if not isinstance(v, list)},
                                                     default=str)[:700])
    r = results.get("pxs")
    if r:
        cv = r["crossval"]
        lines.append(f"pxs crossval ({cv['n_images']} images, {cv['n_patients']} patients): "
                     f"Spearman vs extent {_fmt(cv['pxs_vs_extent']['spearman'])}{_ci(cv['pxs_vs_extent']['spearman_ci95'])}, "
                     f"vs opacity {_fmt(cv['pxs_vs_opacity']['spearman'])}{_ci(cv['pxs_vs_opacity']['spearman_ci95'])}; "
                     f"pretrain {json.dumps(r['pretrain']['metrics'])[:200]}")
    r = results.get("zeroshot")
    if r:
        labels = r["served_validation"]["labels"]
        lines.append("zeroshot (" + str(r.get("arch")) + "): " + ", ".join(
            f"{k} AUC {_fmt(v['auc'])}{_ci(v.get('ci95'))} (n={v['n']})" for k, v in labels.items()))
    return lines


def summary_markdown(summary: dict) -> str:
    out = [f"# Real-data run: {summary['seconds']:.0f} s on {summary['device']}", ""]
    out += [f"- {line}" for line in summary["lines"]]
    out += ["", "Step timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings"].items())]
    if summary["failed"]:
        out += ["", "FAILED: " + json.dumps(summary["failed"], indent=1)]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, str(REPO))
    if argv[:1] == ["_evaluate"]:
        return evaluate_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", help="the real data root (../shared/data or a compact copy)")
    p.add_argument("out", help="run folder (checkpoints, models, results, logs)")
    p.add_argument("families", nargs="*", help=f"any of {' '.join(FAMILIES)} (default: all)")
    p.add_argument("--device", default="auto", help="training device")
    p.add_argument("--eval-device", default="cpu",
                   help="device of the served pipelines (default cpu, as the default model-configs serve)")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole run (default 540)")
    p.add_argument("--deadline", nargs="*", default=[],
                   help="STEP=FRACTION: training deadline of a step as a fraction of --budget "
                        f"(defaults {' '.join(f'{k}={v}' for k, v in DEADLINES.items())})")
    p.add_argument("--sources", nargs="+", help="only these source folders (smoke tests)")
    p.add_argument("--set", nargs="*", help="training overrides KEY=VALUE (all) or FAMILY.KEY=VALUE (one task)")
    p.add_argument("--pxs-folds", type=int, default=5)
    p.add_argument("--pool-max-images", type=int, default=64)
    p.add_argument("--zeroshot-arch", default="vit-b-32")
    p.add_argument("--max-eval", type=int, default=0, help="cap evaluation sets (smoke tests); 0 = all")
    args = p.parse_args(argv)
    unknown = set(args.families) - set(FAMILIES)
    if unknown:
        p.error(f"unknown families {sorted(unknown)}; choose from {' '.join(FAMILIES)}")
    args.data = [args.data]
    args.deadlines = {k: float(v) for k, _, v in (item.partition("=") for item in args.deadline)}
    unknown = set(args.deadlines) - set(DEADLINES)
    if unknown:
        p.error(f"unknown deadline steps {sorted(unknown)}; choose from {' '.join(DEADLINES)}")
    if shutil.which("nvidia-smi"):
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.used,memory.total", "--format=csv"])
    return Runner(args).main()


if __name__ == "__main__":
    raise SystemExit(main())
