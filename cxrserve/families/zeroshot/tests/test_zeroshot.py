"""Zero-shot (CheXzero) model: OpenAI-layout fidelity, import of ensembles, scoring, export parity.

The reference for "OpenAI's CLIP" is open_clip's implementation, which loads OpenAI's
state dicts unchanged: same weights in, same embeddings out. Checkpoints are randomly
initialised and saved in exactly the layout CheXzero's files have (a plain state dict).
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cxrserve.models.checkpoint import load_model
from cxrserve.core.errors import MalformedInput
from cxrserve.models.clip import CLIP, VIT_B_32, ZeroShotCLIP
from cxrserve.synthetic.phantoms import render, sample_spec
from cxrserve.core.transforms import build_transform
from cxrserve.families.zeroshot.importer import export_text_encoder, import_checkpoints
from cxrserve.families.zeroshot.pipeline import (CHEXPERT_LABELS, TextEmbeddingCache, Tokenizer, ZeroShotPipeline,
                                                 embed_labels, pair_probabilities, parse_labels, trim_tokens)

open_clip = pytest.importorskip("open_clip")

SMALL = dict(embed_dim=64, image_resolution=224, vision_layers=2, vision_width=128, vision_patch_size=32,
             context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2, transformer_layers=2)


def openai_clip(seed: int, image_size: int = 224):
    """A randomly initialised CLIP in OpenAI's layout (open_clip, QuickGELU), eval mode."""
    from open_clip.model import CLIP as OpenCLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = OpenCLIP(embed_dim=64, quick_gelu=True,
                     vision_cfg=CLIPVisionCfg(layers=2, width=128, patch_size=32, image_size=image_size, head_width=64),
                     text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=128, heads=2, layers=2))
    return model.eval()


def chexzero_probabilities(model, image: torch.Tensor, labels, tokenizer) -> np.ndarray:
    """CheXzero's zero_shot.py, written out: normalised features, '{}' / 'no {}', exp ratio."""
    with torch.no_grad():
        img = model.encode_image(image)
        img = img / img.norm(dim=-1, keepdim=True)
        out = []
        for template in ("{}", "no {}"):
            text = model.encode_text(tokenizer([template.format(label) for label in labels]))
            text = text / text.norm(dim=-1, keepdim=True)
            out.append((img @ text.t()).numpy())
    pos, neg = out
    return np.exp(pos) / (np.exp(pos) + np.exp(neg))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def phantom_image() -> np.ndarray:
    return render(sample_spec(31, label="pneumonia", height=352, width=320)).image


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- architecture
def test_vit_b_32_has_openai_state_dict_layout():
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    ref_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    with torch.device("meta"):
        ours = CLIP(**VIT_B_32)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_shapes
    assert CLIP.config_from_state_dict(reference.state_dict()) == VIT_B_32


def test_same_weights_give_openai_clip_embeddings(tokenizer):
    reference = openai_clip(0)
    ours = CLIP.from_state_dict(reference.state_dict())
    assert ours.config == SMALL
    images = torch.randn(3, 3, 224, 224)
    tokens = tokenizer(["pleural effusion", "no pleural effusion", "Bilateral patchy opacities, worse on the left."])
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(images), reference.encode_image(images), atol=1e-5)
        assert torch.allclose(ours.encode_text(tokens), reference.encode_text(tokens), atol=1e-5)


def test_trimmed_tokens_give_the_same_text_features(tokenizer):
    model = CLIP(**SMALL).eval()
    tokens = tokenizer(["edema", "no edema", "moderate cardiomegaly with small bilateral pleural effusions"])
    trimmed = trim_tokens(tokens)
    assert trimmed.shape[1] == int((tokens == tokenizer.eot_token_id).nonzero()[:, 1].max()) + 1 < 77
    with torch.no_grad():
        assert torch.allclose(model.encode_text(trimmed), model.encode_text(tokens), atol=1e-5)


def test_tokenizer_cuts_long_text_and_ends_it(tokenizer):
    tokens = tokenizer(["consolidation " * 200, "edema"])
    assert tokens.shape == (2, 77)
    assert int(tokens[0, -1]) == tokenizer.eot_token_id
    n = len(tokenizer._tokenizer.encode("edema"))  # <start> edema <end> then padding
    assert int(tokens[1, 0]) == tokenizer._tokenizer.sot_token_id and int(tokens[1, n + 1]) == tokenizer.eot_token_id
    assert not tokens[1, n + 2:].any()


# --------------------------------------------------------------------------- scoring
def test_pair_probabilities_is_chexzero_formula_averaged_over_members():
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(4, 3, 16, generator=g), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 2, 3, 16, generator=g), dim=-1)
    probs = pair_probabilities(image, text).numpy()
    for n in range(4):
        for lab in range(5):
            per_member = []
            for m in range(3):
                pos = float(image[n, m] @ text[lab, 0, m])
                neg = float(image[n, m] @ text[lab, 1, m])
                per_member.append(math.exp(pos) / (math.exp(pos) + math.exp(neg)))
            assert probs[n, lab] == pytest.approx(np.mean(per_member), abs=1e-6)


@pytest.mark.parametrize("raw,expected", [
    ("Pneumonia, Pleural Effusion", ("Pneumonia", "Pleural Effusion")),
    ('["Pneumonia", "Edema", "Pneumonia"]', ("Pneumonia", "Edema")),
    (b"  lung   opacity \n nodule ", ("lung opacity", "nodule")),
    (["épanchement pleural"], ("épanchement pleural",)),
])
def test_labels_option_parses(raw, expected):
    assert parse_labels(raw) == expected


@pytest.mark.parametrize("raw,words", [
    ("", "no labels"),
    (" , ,", "no labels"),
    ([f"finding {i}" for i in range(65)], "at most 64"),
    (["x" * 201], "longer than"),
    (["esc\x1b[31mred"], "control"),
    ([3], "string"),
    ("[not json", "JSON"),
    ({"a": 1}, "list"),
])
def test_bad_labels_option_is_rejected(raw, words):
    with pytest.raises(ValueError, match=words):
        parse_labels(raw)


def test_text_cache_evicts_least_recently_used():
    cache = TextEmbeddingCache(max_labels=2)
    for label in ("a", "b"):
        cache.put(label, torch.zeros(1))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", torch.zeros(1))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None and cache.misses == 1 and cache.hits == 1


# --------------------------------------------------------------------------- import
def _save_openai(model, path, *, half=False, prefix=""):
    state = {prefix + k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def test_import_averages_an_ensemble_as_chexzero_does(tmp_path, tokenizer, phantom_image):
    members = [openai_clip(1), openai_clip(2)]
    files = [_save_openai(members[0], tmp_path / "best_64_a.pt"),
             # a DataParallel-prefixed fp16 file, as some CheXzero checkpoints are saved
             _save_openai(members[1], tmp_path / "best_64_b.pt", half=True, prefix="module.")]
    out = import_checkpoints(files, tmp_path / "chexzero.ckpt")
    model, card = load_model(out)
    assert isinstance(model, ZeroShotCLIP) and len(model.members) == 2
    assert card.arch_kwargs == {**SMALL, "members": 2} and card.labels == list(CHEXPERT_LABELS)
    assert [e["file"] for e in card.extra["ensemble"]] == ["best_64_a.pt", "best_64_b.pt"]
    assert not card.demo

    # Reference: each checkpoint scored on its own with CheXzero's formula, then averaged.
    members[1].load_state_dict({k: v.half().float() if v.is_floating_point() else v
                                for k, v in members[1].state_dict().items()})
    x = build_transform("chexzero")(phantom_image)[None]
    labels = ["Pneumonia", "Pleural Effusion", "Cardiomegaly"]
    expected = np.mean([chexzero_probabilities(m, x, labels, tokenizer) for m in members], axis=0)
    text = embed_labels(model.encode_text, tokenizer, labels)
    with torch.no_grad():
        got = pair_probabilities(model(x), text).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_import_rejects_members_that_differ(tmp_path):
    a = _save_openai(openai_clip(1), tmp_path / "a.pt")
    other = CLIP(**{**SMALL, "transformer_layers": 1})
    b = _save_openai(other, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="transformer_layers"):
        import_checkpoints([a, b], tmp_path / "x.ckpt")


def test_import_rejects_a_resolution_the_preprocessing_does_not_feed(tmp_path):
    path = _save_openai(openai_clip(1, image_size=320), tmp_path / "res320.pt")
    with pytest.raises(ValueError, match="224"):
        import_checkpoints([path], tmp_path / "x.ckpt")


def test_import_rejects_a_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 1e-4}, path)
    with pytest.raises(ValueError, match="not a state dict"):
        import_checkpoints([path], tmp_path / "x.ckpt")


# --------------------------------------------------------------------------- export + pipeline
@pytest.fixture(scope="module")
def exported_dir(tmp_path_factory):
    """An imported (random) checkpoint exported as the store does: image graph + text.pt."""
    from cxrserve.packaging.export import export_component

    root = tmp_path_factory.mktemp("zeroshot-export")
    ckpt = import_checkpoints([_save_openai(openai_clip(3), root / "m.pt")], root / "m.ckpt")
    model_dir = root / "model"
    export_component(ckpt, model_dir / "zeroshot", formats=("torchscript", "onnx"))
    export_text_encoder(ckpt, model_dir / "zeroshot")
    return ckpt, model_dir


@pytest.mark.parametrize("backend", ["torchscript", "onnx"])
def test_exported_pipeline_serves_the_eager_scores(exported_dir, backend, tokenizer, phantom_image):
    ckpt, model_dir = exported_dir
    model, _ = load_model(ckpt)
    pipeline = ZeroShotPipeline(model_dir, config={"backend": backend})
    result = pipeline.predict_bytes(png_bytes(phantom_image))
    assert list(result["probabilities"]) == list(CHEXPERT_LABELS)
    assert result["labels_source"] == "default" and result["ensemble_size"] == 1

    from cxrserve.families.zeroshot.task import zero_shot_eager

    x = build_transform("chexzero")(phantom_image)
    eager = zero_shot_eager(model, [x], list(CHEXPERT_LABELS), tokenizer, torch.device("cpu"))[0]
    np.testing.assert_allclose(list(result["probabilities"].values()), eager, atol=1e-4)


def test_custom_labels_are_scored_and_cached(exported_dir, tokenizer, phantom_image):
    ckpt, model_dir = exported_dir
    pipeline = ZeroShotPipeline(model_dir, config={"backend": "torchscript", "text_cache_size": 8})
    labels = ["Pneumonia", "ground-glass opacity", "Pleural Effusion", "ground-glass opacity"]
    first = pipeline.predict_bytes(png_bytes(phantom_image), {"labels": ",".join(labels)})
    assert list(first["probabilities"]) == ["Pneumonia", "ground-glass opacity", "Pleural Effusion"]
    assert first["labels_source"] == "request"
    assert len(pipeline.cache) == 1  # default labels come from the start-up embeddings
    default = pipeline.predict_bytes(png_bytes(phantom_image))
    assert first["probabilities"]["Pneumonia"] == default["probabilities"]["Pneumonia"]
    again = pipeline.predict_bytes(png_bytes(phantom_image), {"labels": '["ground-glass opacity"]'})
    assert again["probabilities"]["ground-glass opacity"] == first["probabilities"]["ground-glass opacity"]
    assert pipeline.cache.hits >= 1

    model, _ = load_model(ckpt)
    from cxrserve.families.zeroshot.task import zero_shot_eager

    x = build_transform("chexzero")(phantom_image)
    eager = zero_shot_eager(model, [x], ["ground-glass opacity"], tokenizer, torch.device("cpu"))[0, 0]
    assert first["probabilities"]["ground-glass opacity"] == pytest.approx(float(eager), abs=1e-4)


def test_bad_labels_option_is_a_400(exported_dir, phantom_image):
    _, model_dir = exported_dir
    pipeline = ZeroShotPipeline(model_dir, config={"backend": "torchscript"})
    with pytest.raises(MalformedInput, match="labels"):
        pipeline.predict_bytes(png_bytes(phantom_image), {"labels": "[]"})


def test_text_export_parity_is_recorded(exported_dir):
    import json

    _, model_dir = exported_dir
    report = json.loads((model_dir / "zeroshot" / "text_parity.json").read_text())
    assert report["max_abs_diff"] <= report["atol"] == 1e-4
    assert (model_dir / "zeroshot" / "bpe_simple_vocab_16e6.txt.gz").stat().st_size > 100_000
