"""The value classifier checkpoint built from the bundled encoder and head, through the hf backend."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from esvr.models.value_checkpoint import STAMP, build_value_checkpoint
from esvr.models.value_detector import DEFAULT_HEAD, ValueDetectorConfig, ValueHead, load_value_detector
from esvr.prompts import value_names

TEXTS = [
    "We should protect the forests and the oceans for our children.",
    "I just want to be free to make my own choices.",
    "Thank you, I feel supported and I will keep trying to find a job.",
    "My boss yells at me every day and I am scared of losing the job that pays my rent.",
    "I miss my grandmother. She taught me to respect our traditions and to pray before every meal.",
    # longer than 64 tokens: both backends must cut it at the same place
    "Since the divorce I have been working two jobs so that my kids can stay in the same school with their "
    "friends, and honestly I barely sleep, I skip meals, and I feel guilty whenever I take an hour for myself, "
    "because it feels like I am failing them when I am not earning or helping with homework or cleaning.",
]
TOKENS = 64


def hf_config(*checkpoints: Path, **kwargs) -> ValueDetectorConfig:
    kwargs.setdefault("max_seq_length", TOKENS)
    kwargs.setdefault("trust_remote_code", True)
    return ValueDetectorConfig(backend="hf", checkpoints=[str(c) for c in checkpoints], **kwargs)


def embedding_config(head: Path = DEFAULT_HEAD) -> ValueDetectorConfig:
    # the checkpoint holds the fp32 encoder, so it is compared with the unquantized embedding backend
    return ValueDetectorConfig(backend="embedding", head=head, quantize=False, max_seq_length=TOKENS)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("value-checkpoints")


@pytest.fixture(scope="module")
def checkpoint(root: Path) -> Path:
    return build_value_checkpoint(root / "minilm-values")


@pytest.fixture(scope="module")
def other_head(root: Path) -> Path:
    """A second head (random weights, so its probabilities differ from the committed head's)."""
    rng = np.random.default_rng(7)
    committed = ValueHead.load(DEFAULT_HEAD)
    weights = rng.normal(scale=3.0, size=committed.weights.shape).astype(np.float32)
    bias = rng.normal(size=20).astype(np.float32)
    return ValueHead(weights, bias, 0.4, value_names()).save(root / "other_head.npz")


@pytest.fixture(scope="module")
def other_checkpoint(root: Path, other_head: Path) -> Path:
    return build_value_checkpoint(root / "other-values", other_head)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return load_value_detector(embedding_config()).predict_proba(TEXTS)


def _files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_folder_is_a_multilabel_classifier_with_its_code(checkpoint: Path):
    from transformers import AutoConfig

    config = json.loads((checkpoint / "config.json").read_text())
    names = value_names()
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert config["label2id"] == {n: i for i, n in enumerate(names)}
    assert config["problem_type"] == "multi_label_classification"
    module, _, cls = config["auto_map"]["AutoModelForSequenceClassification"].partition(".")
    assert (checkpoint / f"{module}.py").is_file() and cls == "MeanPoolValueClassifier"
    assert (checkpoint / "model.safetensors").is_file() and not list(checkpoint.glob("*.bin"))
    assert (checkpoint / "tokenizer.json").is_file() and (checkpoint / "tokenizer_config.json").is_file()
    loaded = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    assert loaded.num_labels == 20 and loaded.normalize is True
    stamp = json.loads((checkpoint / STAMP).read_text())
    assert stamp["head"] == DEFAULT_HEAD.name and stamp["threshold"] == ValueHead.load(DEFAULT_HEAD).threshold


def test_hf_backend_gives_the_embedding_backends_probabilities(checkpoint: Path, reference: np.ndarray):
    head = ValueHead.load(DEFAULT_HEAD)
    detector = load_value_detector(hf_config(checkpoint, threshold=head.threshold))
    probs = detector.predict_proba(TEXTS)
    assert probs.shape == (len(TEXTS), 20) and probs.dtype == np.float32
    assert np.abs(probs - reference).max() < 1e-4
    assert probs.std() > 0.05  # real heads on real texts, not a constant
    assert probs[0].argmax() == value_names().index("Universalism: nature")
    embedding = load_value_detector(embedding_config())
    embedding.threshold = head.threshold
    assert detector.detect(TEXTS) == embedding.detect(TEXTS)


def test_label_order_follows_id2label(checkpoint: Path, reference: np.ndarray, tmp_path: Path):
    """A copy whose outputs are permuted, and whose id2label says so, gives the same probabilities."""
    from safetensors.torch import load_file, save_file

    perm = list(np.random.default_rng(3).permutation(20))
    names = value_names()
    copy = Path(shutil.copytree(checkpoint, tmp_path / "permuted"))
    config = json.loads((copy / "config.json").read_text())
    config["id2label"] = {str(i): names[p] for i, p in enumerate(perm)}
    config["label2id"] = {names[p]: i for i, p in enumerate(perm)}
    (copy / "config.json").write_text(json.dumps(config))
    tensors = load_file(copy / "model.safetensors")
    tensors["classifier.weight"] = tensors["classifier.weight"][perm].contiguous()
    tensors["classifier.bias"] = tensors["classifier.bias"][perm].contiguous()
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})

    probs = load_value_detector(hf_config(copy)).predict_proba(TEXTS)
    assert np.abs(probs - reference).max() < 1e-4
    assert np.abs(reference[:, perm] - reference).max() > 0.1  # the permutation does move the outputs

    # labels that name no values (LABEL_0..): the 20 outputs are read in canonical order, as for
    # tum-nlp/Deberta_Human_Value_Detector; here the rows are permuted, so the outputs are too
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(20)}
    config["label2id"] = {f"LABEL_{i}": i for i in range(20)}
    (copy / "config.json").write_text(json.dumps(config))
    unnamed = load_value_detector(hf_config(copy)).predict_proba(TEXTS)
    assert np.abs(unnamed - reference[:, perm]).max() < 1e-4


def test_rebuild_is_a_noop_and_builds_are_deterministic(checkpoint: Path, other_checkpoint: Path, other_head: Path, root: Path):
    before = {f.name: f.stat().st_mtime_ns for f in checkpoint.iterdir()}
    fingerprint = load_value_detector(hf_config(checkpoint)).fingerprint
    assert build_value_checkpoint(checkpoint) == checkpoint
    assert {f.name: f.stat().st_mtime_ns for f in checkpoint.iterdir()} == before
    assert load_value_detector(hf_config(checkpoint)).fingerprint == fingerprint

    # the same inputs give the same bytes
    again = build_value_checkpoint(root / "again")
    assert _files(again) == _files(checkpoint)
    first = load_value_detector(hf_config(again)).fingerprint
    # another head replaces the build in place, and label caches see a different detector
    build_value_checkpoint(again, other_head)
    assert _files(again) == _files(other_checkpoint)
    assert load_value_detector(hf_config(again)).fingerprint != first
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no build folder left behind


def test_two_checkpoints_are_averaged(checkpoint: Path, other_checkpoint: Path, other_head: Path, reference: np.ndarray):
    other = load_value_detector(embedding_config(other_head)).predict_proba(TEXTS)
    single = load_value_detector(hf_config(other_checkpoint)).predict_proba(TEXTS)
    assert np.abs(single - other).max() < 1e-4
    assert np.abs(other - reference).max() > 0.1
    ensemble = load_value_detector(hf_config(checkpoint, other_checkpoint)).predict_proba(TEXTS)
    assert np.abs(ensemble - (reference + other) / 2).max() < 1e-4


def test_long_texts_stop_at_the_encoders_position_limit(checkpoint: Path):
    long_text = " ".join(["I feel alone and I do not know who to ask for help."] * 120)  # ~1600 tokens
    wide = load_value_detector(hf_config(checkpoint, max_seq_length=4096)).predict_proba([long_text])
    at_limit = load_value_detector(hf_config(checkpoint, max_seq_length=512)).predict_proba([long_text])
    assert np.abs(wide - at_limit).max() < 1e-5


def test_mistakes_end_in_one_line_errors(checkpoint: Path, tmp_path: Path):
    with pytest.raises(RuntimeError, match=r"trust_remote_code: true") as err:
        load_value_detector(hf_config(checkpoint, trust_remote_code=False))
    assert "\n" not in str(err.value)
    with pytest.raises(RuntimeError, match="cannot load checkpoint") as err:
        load_value_detector(hf_config(tmp_path / "missing"))
    assert "\n" not in str(err.value)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a checkpoint built by esvr"):
        build_value_checkpoint(occupied)
    assert (occupied / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="value head file not found"):
        build_value_checkpoint(tmp_path / "new", tmp_path / "no_head.npz")
