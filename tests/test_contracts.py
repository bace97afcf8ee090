"""Each family's ``contract.yaml`` checked against what the code and the archived models really do.

As timm's ``test_model_default_cfgs`` checks declared metadata against the real network and
MONAI's ``verify_net_in_out`` runs a bundle's network on tensors built from its
``network_data_format``: for every served model of the store, its archive's networks are
loaded in process and fed an input built from the contract alone (shape, dtype, value
range), and the preprocessing is fed adversarial images; outputs must have the declared
shapes and ranges. Responses to phantoms must hold the declared fields in their ranges,
agree with the family's ``*.schema.json``, and the declarations with the schema. The last
tests break a contract on purpose and expect the same checks to say so.
"""
from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from cxrserve import families
from cxrserve.core.contract import (CONTRACT_FILE, ComponentContract, Contract, FieldSpec, card_value,
                                    contract_path, load_contract)
from schemas import schema_paths, validate

README = "README.md"
COMPOSED = families.composed_model()


def contracts() -> dict[str, Contract]:
    return {name: load_contract(f) for name, f in families.families().items()}


def component_contracts() -> dict[str, ComponentContract]:
    """Every network a contract declares, by contract name (a component folder or a program in one)."""
    out: dict[str, ComponentContract] = {}
    for c in contracts().values():
        for name, comp in c.components.items():
            assert name not in out, f"component {name!r} declared by two families"
            out[name] = comp
    return out


def served_contract(name: str):
    for c in contracts().values():
        if name in c.served:
            return c.served[name]
    raise KeyError(f"no contract declares {name}")


def every_response_fields() -> list[FieldSpec]:
    return [f for c in contracts().values() for f in c.every_response]


def networks_of(served: str) -> list[str]:
    """Contract names of every network a served model's archive ships (programs beside them too)."""
    folders = families.archive_components(served)
    return [name for name, comp in component_contracts().items() if comp.folder in folders]


def pairs() -> list[tuple[str, str]]:
    try:
        return [(s, n) for s in families.served() for n in networks_of(s)]
    except Exception:  # a missing or malformed contract: test_every_family_has_a_readme_and_a_contract says which
        return []


# --------------------------------------------------------------------------- check functions
# Each returns the list of problems (empty when the declaration holds): the tests assert it is
# empty, and the tests at the end assert it is not when a declaration is broken on purpose.
@lru_cache(maxsize=1)
def images() -> dict[str, np.ndarray]:
    """Grey uint8 images that push a preprocessing to its ends: blank, saturated, noise,
    1-3 px checkerboards (cubic overshoot), extreme aspect ratios and a phantom radiograph."""
    from cxrserve.synthetic.phantoms import render, sample_spec

    rng = np.random.default_rng(0)
    yx = np.indices((400, 400)).sum(0)
    out = {"black": np.zeros((300, 260), np.uint8), "white": np.full((300, 260), 255, np.uint8),
           "noise": rng.integers(0, 256, (333, 250)).astype(np.uint8),
           "tall": rng.integers(0, 256, (900, 120)).astype(np.uint8),
           "wide": rng.integers(0, 256, (120, 900)).astype(np.uint8),
           "phantom": render(sample_spec(5, label="covid19", height=320, width=288)).image}
    for side, period in ((320, 1), (320, 2), (320, 3), (400, 3)):  # 320/2 reaches chexzero's cubic bound
        out[f"checker{side}/{period}"] = (((np.indices((side, side)) // period).sum(0) % 2) * 255).astype(np.uint8)
    out["ramp"] = (yx * 255 // yx.max()).astype(np.uint8)
    return out


def preprocessing_problems(comp: ComponentContract, test_images: dict[str, np.ndarray]) -> list[str]:
    """The contract's input against the preprocessing registry and what the transform gives."""
    from cxrserve.core.preprocessing import PREPROCESSING
    from cxrserve.core.transforms import build_transform

    spec = comp.input
    p = PREPROCESSING.get(comp.preprocessing)
    if p is None:
        return [f"{comp.name}: unknown preprocessing {comp.preprocessing!r}"]
    problems = []
    if tuple(spec.shape) != (p.channels, p.input_size, p.input_size):
        problems.append(f"{comp.name}: input shape {list(spec.shape)}, preprocessing {p.name} gives "
                        f"{[p.channels, p.input_size, p.input_size]}")
    low, high = spec.range
    if not (low <= p.value_range[0] and p.value_range[1] <= high):
        problems.append(f"{comp.name}: value_range {[low, high]} narrower than {p.name}'s documented {p.value_range}")
    transform = build_transform(p.name)
    for what, img in test_images.items():
        x = transform(img).numpy()
        problems += [f"{comp.name} on {what}: {m}" for m in spec.problems(x, None)]
    for grey, expected in spec.grey_levels.items():
        x = transform(np.full((300, 300), grey, np.uint8)).numpy()
        want = np.broadcast_to(np.asarray(expected, np.float64).reshape(-1, 1, 1), x.shape)
        if not np.allclose(x, want, atol=1e-4):
            problems.append(f"{comp.name}: grey level {grey} -> {[float(c.mean()) for c in x]}, declared {expected}")
    return problems


def card_problems(comp: ComponentContract, card) -> list[str]:
    """The contract against the card that travels with the weights (timm: cfg against the model)."""
    if comp.preprocessing is None:
        return []
    problems = []
    if comp.preprocessing != card.preprocessing:
        problems.append(f"{comp.name}: preprocessing {comp.preprocessing!r}, card says {card.preprocessing!r}")
    if comp.input.resolve_shape(card) != (card.channels, card.input_size, card.input_size):
        problems.append(f"{comp.name}: input {list(comp.input.shape)}, card says "
                        f"{[card.channels, card.input_size, card.input_size]}")
    return problems


def run_network(comp: ComponentContract, part, batch: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Per-item outputs of the archived network, as the pipeline runs it (its runtime, or the program)."""
    import torch

    x = torch.from_numpy(batch)
    if comp.file is None:
        outs = part.runtime(x)
    else:  # a program beside the component (zero-shot's text tower), loaded as the worker loads it
        from cxrserve.core.runtime import load_torchscript

        program = load_torchscript(part.path / comp.file, torch.device("cpu"))
        with torch.inference_mode():
            result = program(x)
        outs = tuple(o.float().numpy() for o in (result if isinstance(result, (tuple, list)) else (result,)))
    return [tuple(o[i] for o in outs) for i in range(len(batch))]


def network_problems(comp: ComponentContract, part, extra_inputs: list[np.ndarray] = ()) -> list[str]:
    """The archived network on a batch built from the contract (and on real preprocessed inputs)."""
    card = part.card
    problems = card_problems(comp, card)
    batches = [comp.input.example(card)] + [np.stack(extra_inputs)] if len(extra_inputs) else [comp.input.example(card)]
    for batch in batches:
        try:
            outputs = run_network(comp, part, batch)
        except Exception as err:  # a network that refuses the declared input is the finding
            return problems + [f"{comp.name}: refuses an input of shape {list(batch.shape[1:])}: "
                               f"{type(err).__name__}: {str(err)[:200]}"]
        for item in outputs:
            problems += comp.problems(item, card)
    return sorted(set(problems))


def response_problems(contract, response: dict, *, active: set[str], labels: dict[str, list[str]]) -> list[str]:
    """One response against a served model's declared fields and every family's every-response fields."""
    size = (response["input"]["width"], response["input"]["height"])
    problems = []
    for spec in (*contract.response, *every_response_fields()):
        problems += spec.problems(response, active=active, labels=labels, full_size=size)
    return problems


def schema_node(schema: dict, path: str, common: dict):
    """The schema of a dotted response path (local ``#/$defs`` refs followed; the common base's
    properties, such as ``input_gate``, when the model's own schema does not name the field)."""
    def resolve(node, root):
        while isinstance(node, dict) and str(node.get("$ref", "")).startswith("#/$defs/"):
            node = root["$defs"][node["$ref"].removeprefix("#/$defs/")]
        return node

    for root in (schema, common):
        node = resolve(root if root is schema else root["$defs"]["base"], root)
        for part in path.split("."):
            if not isinstance(node, dict):
                break
            extra = node.get("additionalProperties")  # an open map (timings_ms): any key has its schema
            node = resolve((node.get("properties") or {}).get(part, extra if isinstance(extra, dict) else None), root)
        if node is not None:
            return node
    return None


def schema_problems(name: str, contract) -> list[str]:
    schema = json.loads(schema_paths()[name].read_text())
    common = json.loads(schema_paths()["common"].read_text())
    problems = []
    fields = {f.path: f for f in (*contract.response, *every_response_fields())}
    for path, spec in fields.items():
        node = schema_node(schema, path, common)
        if node is None:
            problems.append(f"{name}: {path} is not in its schema")
            continue
        if spec.type == "labelled":  # a label -> number map: the schema of its values
            extra = node.get("additionalProperties")
            node = extra if isinstance(extra, dict) else next(iter((node.get("properties") or {}).values()), {})
        if spec.range is not None:
            for end, key in zip(spec.range, ("minimum", "maximum")):
                if end != node.get(key):
                    problems.append(f"{name}: {path} {key} {end}, schema {node.get(key)}")
        if spec.values and list(spec.values) != list(node.get("enum", spec.values)):
            problems.append(f"{name}: {path} values {list(spec.values)}, schema {node.get('enum')}")
    required = set(schema.get("required", ()))
    declared = {f.path.split(".")[0] for f in contract.response if f.when is None}
    problems += [f"{name}: schema requires {r!r}, the contract does not declare it" for r in sorted(required - declared)]
    return problems


def option_problems(contract, pipeline) -> list[str]:
    declared = {k: (o.default, o.picture) for k, o in contract.options.items()}
    real = {k: (o.default, o.picture) for k, o in pipeline.OPTIONS.items()}
    return [] if declared == real else [f"{contract.name}: options {declared}, pipeline has {real}"]


# --------------------------------------------------------------------------- the folder
@pytest.mark.parametrize("name", sorted(families.families()))
def test_every_family_has_a_readme_and_a_contract(name):
    family = families.families()[name]
    assert (family.folder / README).is_file(), f"{family.folder}/{README} missing"
    assert contract_path(family).name == CONTRACT_FILE
    contract = load_contract(family)  # parses strictly: unknown keys are errors
    assert contract.components or contract.served or contract.every_response


def test_every_served_model_and_component_is_covered(model_store):
    table = contracts()
    comps = component_contracts()
    for name, (family, served) in families.served().items():
        owners = [f for f, c in table.items() if name in c.served]
        assert owners == [family.name], f"{name} is declared by {owners}, served by {family.name}"
        contract = table[family.name].served[name]
        assert contract.components == served.components
        assert contract.compose == served.compose
        assert set(contract.inputs) == {"image", *families.pipeline_class(name).extra_images} or served.compose
        missing = [c for c in families.archive_components(name) if c not in comps]
        assert not missing, f"{name}.mar ships components no contract declares: {missing}"
    in_store = {p.stem for p in Path(model_store).glob("*.mar")}
    assert in_store and in_store <= set(families.served()), f"archives without a served model: {in_store}"


@pytest.mark.parametrize("name", sorted(n for n, c in component_contracts().items() if c.preprocessing))
def test_preprocessing_keeps_the_declared_input(name):
    assert preprocessing_problems(component_contracts()[name], images()) == []


# --------------------------------------------------------------------------- the models
def archived_part(pipeline, folder: str):
    return pipeline.gate if folder == "gate" else pipeline.parts[folder]


@pytest.mark.parametrize("served,network", pairs())
def test_archived_network_keeps_its_contract(pipeline, served, network):
    from cxrserve.core.transforms import build_transform

    comp = component_contracts()[network]
    part = archived_part(pipeline(served), comp.folder)
    real = []
    if comp.preprocessing:  # what serving feeds it, beside the contract-built batch
        transform = build_transform(part.card.preprocessing)
        real = [transform(img).numpy() for img in images().values()]
    assert network_problems(comp, part, real) == []


@pytest.fixture(scope="module")
def phantom_pngs():
    from cxrserve.synthetic.phantoms import render, sample_spec
    from tsutil import png

    # a small film and one past the picture limit (1024 px), so pictures are checked at both sizes
    return {"small": png(render(sample_spec(31, label="pneumonia", height=320, width=288)).image),
            "large": png(render(sample_spec(32, label="covid19", height=1300, width=1100)).image),
            "prior": png(render(sample_spec(33, label="normal", height=320, width=288)).image)}


def card_labels(pipeline) -> dict[str, list[str]]:
    parts = {**pipeline.parts, **({"gate": pipeline.gate} if pipeline.gate is not None else {})}
    return {name: list(p.card.labels) for name, p in parts.items()}


@pytest.mark.parametrize("name", sorted(families.served()))
def test_responses_keep_the_contract(pipeline, phantom_pngs, name):
    contract = served_contract(name)
    pipe = pipeline(name)
    assert option_problems(contract, pipe) == []
    pictures = {k for k, o in contract.options.items() if o.picture}
    extra = {n: phantom_pngs["prior"] for n in contract.inputs if n != "image"}
    problems = []
    for size in ("small", "large"):
        for on in (True, False):  # every optional field present, then every one absent
            options = ({"pictures": "true"} if contract.compose else {k: "true" for k in pictures}) if on else {}
            response = pipe.predict_bytes(phantom_pngs[size], options, **(extra if on else {}))
            validate(response, name)
            # the options in force (defaults too: lungseg's mask is on unless turned off) and the inputs sent
            parsed = pipe.parse_options(options)
            active = {k for k, v in parsed.items() if v is True} | (set(extra) if on else set())
            problems += [f"{size}, options {'on' if on else 'off'}: {p}" for p in
                         response_problems(contract, response, active=active, labels=card_labels(pipe))]
            if contract.compose:
                problems += [f"{size}: {p}" for p in section_problems(pipe, response, on, set(extra) if on else set())]
    assert problems == []


def section_problems(study, response: dict, pictures: bool, sent: set[str]) -> list[str]:
    """Each section of a composed answer against its own model's contract."""
    problems = []
    sections = response["results"]
    keys = {families.get_served(n)[1].key: n for n in families.composed(response["model"])}
    if set(sections) != set(keys):
        problems.append(f"sections {sorted(sections)}, composed models {sorted(keys)}")
    for key, section in sections.items():
        contract = served_contract(keys[key])
        fam = study.families[key]
        active = ({k for k, o in contract.options.items() if o.picture} if pictures else set()) | \
                 (sent & set(contract.inputs))
        problems += [f"results.{key}.{p}" for p in
                     response_problems(contract, section, active=active, labels=card_labels(fam))]
    return problems


@pytest.mark.parametrize("name", sorted(families.served()))
def test_declared_fields_agree_with_the_schema(name):
    assert schema_problems(name, served_contract(name)) == []


# --------------------------------------------------------------------------- it can fail
def test_a_wrong_declared_input_size_is_caught(pipeline):
    comp = component_contracts()["lungseg"]
    wrong = dataclasses.replace(comp, input=dataclasses.replace(comp.input, shape=(1, 256, 256)))
    found = preprocessing_problems(wrong, images())
    assert any("input shape [1, 256, 256], preprocessing lungseg gives [1, 224, 224]" in p for p in found)
    found = network_problems(wrong, pipeline("cxr-lungseg").parts["lungseg"])
    assert any("card says [1, 224, 224]" in p for p in found), found


def test_wrong_output_declarations_are_caught(pipeline):
    part = pipeline("cxr-triage").parts["triage_classifier"]
    comp = component_contracts()["triage_classifier"]
    probs, cams = comp.outputs
    for broken, expected in (
        ((dataclasses.replace(probs, sum=2), cams), "sum along the last axis"),
        ((dataclasses.replace(probs, shape=(4,)), cams), "probabilities: shape (3,), declared (4,)"),
        ((probs, dataclasses.replace(cams, range=(0, 1))), "cams: minimum"),
        ((probs,), "2 outputs, declared 1"),
    ):
        found = network_problems(dataclasses.replace(comp, outputs=broken), part)
        assert any(expected in p for p in found), (expected, found)
    narrow = dataclasses.replace(component_contracts()["zeroshot"], input=dataclasses.replace(
        component_contracts()["zeroshot"].input, range=(-1.6, 2.2)))  # the range transforms.py documents
    assert any("checker320/2" in p and "below -1.6" in p for p in preprocessing_problems(narrow, images()))


def test_wrong_response_declarations_are_caught(pipeline, phantom_pngs):
    pipe = pipeline("cxr-severity")
    response = pipe.predict_bytes(phantom_pngs["small"], {})
    contract = served_contract("cxr-severity")
    fields = {f.path: f for f in contract.response}
    for path, change, expected in (
        ("geographic_extent", {"range": (None, -1)}, "above -1"),
        ("saliency_png", {"when": None}, "saliency_png: missing"),
        ("opacity", {"type": "integer"}, "is not a integer"),
    ):
        broken = dataclasses.replace(contract, response=tuple(
            dataclasses.replace(f, **change) if f.path == path else f for f in contract.response))
        found = response_problems(broken, response, active=set(), labels=card_labels(pipe))
        assert any(expected in p for p in found), (path, found)
    assert fields["opacity"].range == (0, 6)
    broken = dataclasses.replace(contract, response=(*contract.response, FieldSpec("opacity_max", "number")))
    assert "cxr-severity: opacity_max is not in its schema" in schema_problems("cxr-severity", broken)


def test_card_dims_resolve():
    class Card:
        labels = ["a", "b"]
        arch_kwargs = {"embed_dim": 7}

    assert card_value("labels", Card) == 2 and card_value("arch_kwargs.embed_dim", Card) == 7
    with pytest.raises(ValueError):
        card_value("embed_dim", Card)
