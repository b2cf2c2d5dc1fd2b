"""Value detector: the committed head, head training, the hf ensemble and the llm backend."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data

from esvr.models.chat import ChatModel
from esvr.models.value_detector import (
    DEFAULT_HEAD,
    HFValueDetector,
    LLMValueDetector,
    SentenceEncoder,
    ValueDetectorConfig,
    ValueHead,
    export_onnx_encoder,
    keep_layers,
    load_value_detector,
    marking_rates,
    minilm_path,
)
from esvr.prompts import value_names
from esvr.tasks.labeling.value_head import (
    f1_per_value,
    fit_heads,
    fold_thresholds,
    read_touche_split,
    train_value_head,
    tune_threshold,
    tune_value_thresholds,
)

TEXTS = [
    "We should protect the forests and the oceans for our children.",
    "I just want to be free to make my own choices.",
    "Thank you, I feel supported and I will keep trying to find a job.",
]


@pytest.fixture(scope="module")
def default_detector():
    return load_value_detector(ValueDetectorConfig())


def test_committed_head_loads_with_its_metrics():
    head = ValueHead.load(DEFAULT_HEAD)
    assert head.names == value_names() and len(head.names) == 20
    assert head.weights.shape == (20, 384) and head.bias.shape == (20,)
    assert 0 < head.threshold < 1
    # trained end to end on MiniLM's first 2 layers: the head carries their change (int8, ~3.5 MB)
    assert head.layers == 2 and head.encoder_delta and all(n.startswith("encoder.layer.") for n in head.encoder_delta)
    assert DEFAULT_HEAD.stat().st_size < 8_000_000
    metrics = json.loads(DEFAULT_HEAD.with_name("value_head.metrics.json").read_text())
    assert metrics["threshold_selected_on"] == "validation"
    assert metrics["threshold"] == pytest.approx(head.threshold)
    assert 0.3 < metrics["test_macro_f1"] < 1 and set(metrics["test_f1_per_value"]) == set(value_names())


def test_default_detector_output_shape_and_detect(default_detector):
    probs = default_detector.predict_proba(TEXTS)
    assert probs.shape == (3, 20) and probs.dtype == np.float32
    assert ((probs >= 0) & (probs <= 1)).all()
    assert default_detector.predict_proba([]).shape == (0, 20)
    detected = default_detector.detect(TEXTS)
    assert len(detected) == 3 and all(set(d) <= set(value_names()) for d in detected)
    # the nature argument is about nature
    assert probs[0, value_names().index("Universalism: nature")] == probs[0].max()


def test_quantized_encoder_agrees_with_fp32(default_detector):
    fp32 = load_value_detector(ValueDetectorConfig(runtime="torch", quantize=False))
    assert default_detector.encoder.quantized and not fp32.encoder.quantized
    assert np.abs(fp32.predict_proba(TEXTS) - default_detector.predict_proba(TEXTS)).max() < 0.2
    assert fp32.fingerprint != default_detector.fingerprint


def test_onnx_runtime_int8_agrees_with_torch_and_is_exported_once(default_detector):
    onnx = load_value_detector(ValueDetectorConfig(runtime="onnx"))
    assert onnx.encoder.runtime == "onnx" and onnx.encoder.quantized
    assert default_detector.encoder.runtime == "torch" and onnx.fingerprint != default_detector.fingerprint
    onnx_emb, torch_emb = onnx.encoder.encode(TEXTS), default_detector.encoder.encode(TEXTS)
    assert onnx_emb.shape == torch_emb.shape == (3, 384)
    assert (np.sum(onnx_emb * torch_emb, axis=1) > 0.85).all()
    assert np.abs(onnx.predict_proba(TEXTS) - default_detector.predict_proba(TEXTS)).max() < 0.15
    assert onnx.encoder.encode([]).shape == (0, 384)
    # the export is made once and then reused as it is
    layers = onnx.encoder.layers
    path = export_onnx_encoder(minilm_path(), layers=layers)
    stamp = path.stat().st_mtime_ns
    assert export_onnx_encoder(minilm_path(), layers=layers) == path and path.stat().st_mtime_ns == stamp


def test_a_head_may_read_the_first_layers_only(tmp_path: Path, default_detector):
    """A head trained on the first 3 of MiniLM's 6 layers halves the encoder's cost
    (docs/labeling.md); every runtime cuts the encoder the same way."""
    committed = ValueHead.load(DEFAULT_HEAD)
    assert committed.layers == 2 and default_detector.encoder.layers == 2
    head = ValueHead(committed.weights, committed.bias, committed.threshold, committed.names, layers=3)  # the stock layers
    path = head.save(tmp_path / "head.npz")
    assert ValueHead.load(path).layers == 3 and not ValueHead.load(path).encoder_delta
    onnx = load_value_detector(ValueDetectorConfig(head=path, runtime="onnx"))
    torch_fp32 = load_value_detector(ValueDetectorConfig(head=path, runtime="torch", quantize=False))
    assert onnx.encoder.layers == 3 and len(torch_fp32.encoder.model[0].auto_model.encoder.layer) == 3
    cut = torch_fp32.encoder.encode(TEXTS)
    assert (np.sum(cut * SentenceEncoder(max_seq_length=64).encode(TEXTS), axis=1) < 0.99).all()  # not the last layer's
    assert (np.sum(cut * onnx.encoder.encode(TEXTS), axis=1) > 0.9).all()
    with pytest.raises(ValueError, match="reads 7 encoder layers; the encoder has 3"):
        keep_layers(torch_fp32.encoder.model[0].auto_model, 7)


# Utterances as people write them on r/offmychest: distress, news, thanks, small talk.
REDDIT_LIKE = [
    "I finally told my mom that I've been struggling with anxiety for years and she just hugged me.",
    "My boyfriend of four years cheated on me with my best friend and I found out from a group chat.",
    "I got the job! After eight months of rejections I actually got an offer today.",
    "Honestly I'm so tired of pretending everything is fine at work when I cry in my car every lunch break.",
    "My dad passed away last week and I keep picking up my phone to call him.",
    "Thank you all for the kind words, I read every single comment last night.",
    "I don't even know why I'm posting this, I just needed to say it somewhere.",
    "My roommate keeps eating my food and when I bring it up she acts like I'm the problem.",
    "I've been sober for 100 days today. Nobody in my life knows, so I'm telling you guys.",
    "We had to put our dog down this morning. She was 14 and the best girl.",
    "I'm 27 and still living with my parents and I feel like a complete failure.",
    "That sounds really hard, I'm sorry you're going through this alone.",
    "Lol same, my cat does the exact same thing at 3am.",
    "I quit my job without another one lined up and I'm terrified but also kind of relieved.",
    "My sister didn't invite me to her wedding and I found out on Instagram.",
    "Does anyone else feel lonely even when they're surrounded by people?",
    "I hate that I still care what my ex thinks of me.",
    "Update: I talked to my manager and she was actually super understanding about it.",
    "I've gained 20 pounds this year and I can't stand looking in the mirror anymore.",
    "You don't owe anyone an explanation for protecting your peace.",
    "My grandma forgot my name today. She's had dementia for two years but today it really hit me.",
    "I got into grad school and my family didn't even say congratulations.",
    "I keep apologizing for everything, even when it's not my fault.",
    "It's been a year since the breakup and I think I'm finally okay.",
    "My landlord is raising the rent again and I genuinely don't know how I'm going to pay it.",
    "Sending you a big hug, you deserve so much better than this.",
    "I yelled at my kids today and I feel like the worst parent in the world.",
    "I don't have any friends at my new school and I eat lunch in the library every day.",
    "Sometimes I wonder if anyone would notice if I just disappeared for a while.",
    "Thanks, that actually helps a lot. I think I'll call her tomorrow.",
]


def test_committed_head_marks_few_values_on_conversational_text(default_detector):
    """One threshold tuned for F1 on arguments marked 4 values per utterance here, five of them in
    over a third of the utterances, Security: personal in 77%. The committed per-value thresholds,
    capped at the annotators' rates and at a fifth of ESConv's seeker turns (not these texts), mark
    under 2, and no value in more than 40% of them."""
    marked = default_detector.predict_proba(REDDIT_LIKE) >= default_detector.threshold
    assert marked.sum(1).mean() <= 2.0
    assert (marked.mean(0) <= 0.4).all()
    rates = marking_rates(default_detector.predict_proba(REDDIT_LIKE), default_detector.threshold)
    assert rates["value_rate.security_personal"] == pytest.approx(
        marked[:, value_names().index("Security: personal")].mean(), abs=1e-4
    )
    assert len(rates) == 20 and marking_rates(np.zeros((0, 20)), 0.5)["value_rate.humility"] == 0.0


def test_per_value_thresholds_mark_no_more_than_the_labels_and_fold_into_the_bias():
    rng = np.random.default_rng(0)
    y = (rng.random((400, 20)) < np.linspace(0.05, 0.4, 20)).astype(np.int8)
    # a noisy score: F1 alone would mark the common values far more often than they occur
    probs = np.clip(0.35 * y + rng.random((400, 20)) * 0.75, 0, 1)
    free = tune_value_thresholds(y, probs, max_rate_ratio=None)
    capped = tune_value_thresholds(y, probs, max_rate_ratio=1.0)
    assert ((probs >= free).mean(0) > y.mean(0)).any()
    assert ((probs >= capped).mean(0) <= y.mean(0) + 1e-9).all()
    assert f1_per_value(y, (probs >= free).astype(np.int8)).mean() >= f1_per_value(y, (probs >= capped).astype(np.int8)).mean()
    head = ValueHead(rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=20).astype(np.float32), 0.4, value_names())
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    folded = fold_thresholds(head, capped)
    assert folded.threshold == 0.5
    assert ((folded.proba(emb) >= 0.5) == (head.proba(emb) >= capped)).mean() > 0.999


def test_per_value_thresholds_keep_each_value_within_a_share_of_unlabeled_text():
    rng = np.random.default_rng(1)
    y = (rng.random((400, 20)) < 0.3).astype(np.int8)
    probs = np.clip(0.35 * y + rng.random((400, 20)) * 0.75, 0, 1)
    # conversational text the head over-scores on one value (as Security: personal on first-person
    # distress): without the cap it is marked in most of it
    chat = rng.random((300, 20)) * 0.6
    chat[:, 8] += 0.35
    plain = tune_value_thresholds(y, probs, max_rate_ratio=1.0)
    capped = tune_value_thresholds(y, probs, max_rate_ratio=1.0, unlabeled_probs=chat, max_unlabeled_rate=1 / 3)
    assert (chat >= plain).mean(0)[8] > 1 / 3
    assert ((chat >= capped).mean(0) <= 1 / 3 + 1e-9).all()
    assert ((probs >= capped).mean(0) <= y.mean(0) + 1e-9).all()  # the label-rate cap still holds
    # a value no threshold keeps within the cap is marked as rarely as the grid allows
    impossible = tune_value_thresholds(y, probs, unlabeled_probs=np.ones((10, 20)), max_unlabeled_rate=0.1)
    assert (impossible == np.float32(0.95)).all()


def test_label_stats_report_per_value_marking_rates(tmp_path: Path, default_detector):
    from test_label_flow import write_threads

    from esvr.models.emotion import VaderEmotionScorer
    from esvr.tasks.labeling.label import LabelConfig, label_threads, read_labels

    cfg = LabelConfig(progress=False)
    out = label_threads(
        write_threads(tmp_path / "threads.parquet"),
        tmp_path / "label",
        cfg,
        detector=default_detector,
        scorer=VaderEmotionScorer(),
    )
    stats = json.loads(out["stats"].read_text())
    probs = np.stack(read_labels(out["labels"])["values"].to_numpy())
    for j, name in enumerate(value_names()):
        assert stats[f"value_rate.{name.lower().replace(': ', '_').replace('-', '_')}"] == pytest.approx(
            (probs[:, j] >= default_detector.threshold).mean(), abs=1e-4
        )


def test_head_roundtrip_and_bad_files(tmp_path: Path):
    rng = np.random.default_rng(0)
    head = ValueHead(rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=20).astype(np.float32), 0.4, value_names())
    loaded = ValueHead.load(head.save(tmp_path / "h.npz"))
    emb = rng.normal(size=(5, 8)).astype(np.float32)
    assert np.allclose(loaded.proba(emb), head.proba(emb), atol=2e-3)
    assert loaded.threshold == 0.4
    wrong = ValueHead(head.weights, head.bias, 0.4, list(reversed(value_names())))
    with pytest.raises(ValueError, match="values.yaml"):
        ValueHead.load(wrong.save(tmp_path / "wrong.npz"))
    with pytest.raises(FileNotFoundError, match="train-value-head"):
        ValueHead.load(tmp_path / "missing.npz")


def test_joint_fit_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6))
    y = (x @ rng.normal(size=(6, 3)) + rng.normal(size=(300, 3)) > 0.5).astype(np.int8)
    for cw in (None, "balanced"):
        w, b = fit_heads(x, y, c=0.7, class_weight=cw)
        for j in range(3):
            ref = LogisticRegression(C=0.7, class_weight=cw, max_iter=5000, tol=1e-8).fit(x, y[:, j])
            assert np.allclose(w[j], ref.coef_[0], atol=2e-3) and abs(b[j] - ref.intercept_[0]) < 2e-3


def test_threshold_tuning_and_f1_by_hand():
    y = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=np.int8)
    pred = np.array([[1, 1], [0, 1], [0, 1], [0, 0]], dtype=np.int8)
    # value 0: tp 1, fn 1 -> 2/3; value 1: tp 2, fp 1 -> 4/5
    assert np.allclose(f1_per_value(y, pred), [2 / 3, 4 / 5])
    # a value nobody labelled or predicted, and one labelled but never predicted: both score 0
    unseen = np.array([[0, 1], [0, 0], [0, 1], [0, 0]], dtype=np.int8)
    assert np.allclose(f1_per_value(unseen, np.zeros_like(unseen)), [0, 0])
    probs = np.array([[0.9, 0.2], [0.7, 0.8], [0.1, 0.6], [0.2, 0.1]])
    thr, f1 = tune_threshold(y, probs)
    assert f1 == pytest.approx(1.0) and 0.2 <= thr <= 0.6


def test_training_on_a_touche_slice(tmp_path: Path):
    data = shared_data("touche23-valueeval")
    split = read_touche_split(data, "validation", limit=5)
    assert len(split.texts) == 5 and split.labels.shape == (5, 20)
    metrics = train_value_head(data, tmp_path / "head.npz", limit=120, c_grid=(1.0,), class_weights=("balanced",))
    head = ValueHead.load(tmp_path / "head.npz")
    assert head.threshold == metrics["threshold"]
    assert metrics["n_arguments"] == {"training": 120, "validation": 120, "test": 120}
    assert 0 <= metrics["test_macro_f1"] <= 1 and len(metrics["test_f1_per_value"]) == 20
    saved = json.loads((tmp_path / "head.metrics.json").read_text())
    assert saved["test_macro_f1"] == metrics["test_macro_f1"]
    det = load_value_detector(ValueDetectorConfig(head=tmp_path / "head.npz"))
    assert det.predict_proba(TEXTS[:1]).shape == (1, 20)


# --------------------------------------------------------------------------------------------
# hf backend on tiny random checkpoints
# --------------------------------------------------------------------------------------------


def _tiny_classifier(path: Path, seed: int, permutation: list[int] | None = None) -> Path:
    """A tiny random BERT multi-label classifier over the 20 values, with MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    names = value_names()
    order = permutation or list(range(20))
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=20,
        problem_type="multi_label_classification",
        id2label={i: names[order[i]] for i in range(20)},
        label2id={names[order[i]]: i for i in range(20)},
    )
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("tiny-value-clf")
    return [_tiny_classifier(root / "a", 0), _tiny_classifier(root / "b", 1)]


def test_hf_backend_averages_sigmoids(tiny_checkpoints: list[Path]):
    a = HFValueDetector([str(tiny_checkpoints[0])], batch_size=2)
    b = HFValueDetector([str(tiny_checkpoints[1])], batch_size=2)
    cfg = ValueDetectorConfig(backend="hf", checkpoints=[str(p) for p in tiny_checkpoints], batch_size=2)
    ens = load_value_detector(cfg)
    assert ens.threshold == 0.26  # Schroter et al.'s
    pa, pb, pe = a.predict_proba(TEXTS), b.predict_proba(TEXTS), ens.predict_proba(TEXTS)
    assert pe.shape == (3, 20) and ((pe > 0) & (pe < 1)).all()
    assert np.allclose(pe, (pa + pb) / 2, atol=1e-5)
    assert pa.std() > 0  # random weights, not a constant
    assert len(ens.detect(TEXTS)) == 3


def test_hf_backend_maps_labels_by_name(tiny_checkpoints: list[Path], tmp_path: Path):
    """A checkpoint whose outputs are permuted (and named so) gives the same canonical vector."""
    import torch
    from transformers import AutoModelForSequenceClassification

    perm = list(range(19, -1, -1))
    src = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoints[0])
    dst_path = _tiny_classifier(tmp_path / "perm", 0, perm)
    dst = AutoModelForSequenceClassification.from_pretrained(dst_path)
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        dst.classifier.weight.copy_(src.classifier.weight[perm])
        dst.classifier.bias.copy_(src.classifier.bias[perm])
    dst.save_pretrained(dst_path)
    ref = HFValueDetector([str(tiny_checkpoints[0])]).predict_proba(TEXTS)
    got = HFValueDetector([str(dst_path)]).predict_proba(TEXTS)
    assert np.allclose(ref, got, atol=1e-5)


def test_hf_backend_names_a_missing_checkpoint(tmp_path: Path):
    with pytest.raises(RuntimeError, match="cannot load checkpoint"):
        HFValueDetector([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="at least one checkpoint"):
        HFValueDetector([])


# --------------------------------------------------------------------------------------------
# llm backend
# --------------------------------------------------------------------------------------------


class ScriptedChat(ChatModel):
    """A chat model at the edge of the world: P(Yes) is 0.9 when the value is 'Achievement'."""

    cache_id = "scripted"

    def __init__(self) -> None:
        super().__init__()
        self.prompts: list[str] = []

    def _generate(self, requests):
        return [["Yes"] for _ in requests]

    def _score(self, messages, choices):
        text = messages[-1]["content"]
        self.prompts.append(text)
        yes = 0.9 if 'value "Achievement"' in text else 0.2
        return {"Yes": yes, "No": 1 - yes}


def test_llm_backend_scores_each_value():
    chat = ScriptedChat()
    det = load_value_detector(ValueDetectorConfig(backend="llm"), chat)
    assert isinstance(det, LLMValueDetector) and det.threshold == 0.5
    probs = det.predict_proba(["I worked hard and got the promotion."])
    assert probs.shape == (1, 20) and len(chat.prompts) == 20
    assert probs[0, value_names().index("Achievement")] == pytest.approx(0.9)
    assert det.detect(["x"]) == [["Achievement"]]
    assert "I worked hard" in chat.prompts[0] and "Self-direction: thought" in chat.prompts[0]
    with pytest.raises(ValueError, match="chat model"):
        load_value_detector(ValueDetectorConfig(backend="llm"))


# --------------------------------------------------------------------------------------------
# end-to-end training (the encoder's layers with the head)
# --------------------------------------------------------------------------------------------

_TOPICS = {
    "Universalism: nature": "we must protect the forests, the rivers and the animals that live there",
    "Self-direction: action": "people should be free to choose their own path and decide for themselves",
    "Security: personal": "this keeps my family safe and healthy and out of danger at home",
}


def _touche_folder(folder: Path, per_split: int = 24) -> Path:
    """A Touché23-shaped folder whose premises name one of three values by topic."""
    names = value_names()
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("training", "validation", "test"):
        args = ["Argument ID\tConclusion\tStance\tPremise"]
        labels = ["Argument ID\t" + "\t".join(names)]
        for i in range(per_split):
            value, premise = list(_TOPICS.items())[i % len(_TOPICS)]
            arg_id = f"{split[0].upper()}{i:04d}"
            args.append(f"{arg_id}\tWe should act\tin favor of\t{premise}, argument {i}")
            labels.append(arg_id + "\t" + "\t".join("1" if n == value else "0" for n in names))
        (folder / f"arguments-{split}.tsv").write_text("\n".join(args) + "\n")
        (folder / f"labels-{split}.tsv").write_text("\n".join(labels) + "\n")
    return folder


def test_an_encoder_delta_survives_the_head_file_within_int8_rounding(tmp_path: Path):
    rng = np.random.default_rng(0)
    delta = {"encoder.layer.0.output.dense.weight": rng.normal(0, 0.01, (384, 1536)).astype(np.float32)}
    delta["encoder.layer.0.output.dense.bias"] = rng.normal(0, 0.01, 384).astype(np.float32)
    head = ValueHead(np.zeros((20, 384), np.float32), np.zeros(20, np.float32), 0.5, value_names(), encoder_delta=delta)
    loaded = ValueHead.load(head.save(tmp_path / "head.npz")).encoder_delta
    assert set(loaded) == set(delta)
    for name, d in delta.items():
        assert np.abs(loaded[name] - d).max() <= 0.005 * np.abs(d).max()


def test_end_to_end_settings_refuse_what_cannot_train():
    from esvr.tasks.labeling.value_head import EndToEnd

    with pytest.raises(ValueError, match="at least 1 epoch"):
        EndToEnd(epochs=-1)
    with pytest.raises(ValueError, match="learning rates must be > 0"):
        EndToEnd(lr=0)


def test_end_to_end_training_changes_the_encoder_and_every_loader_reads_the_change(tmp_path: Path):
    from esvr.models.value_checkpoint import build_value_checkpoint
    from esvr.tasks.labeling.value_head import EndToEnd

    data = _touche_folder(tmp_path / "touche")
    settings = EndToEnd(epochs=2, lr=2e-4, head_lr=1e-2, batch_size=8)
    metrics = train_value_head(data, tmp_path / "head.npz", max_seq_length=32, layers=1, end_to_end=settings)
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    assert metrics["epochs"][1]["loss"] < metrics["epochs"][0]["loss"]
    head = ValueHead.load(tmp_path / "head.npz")
    assert head.layers == 1 and head.threshold == 0.5
    # the first layer's weights trained, the embeddings table stayed as it was
    assert head.encoder_delta and all(n.startswith("encoder.layer.0.") for n in head.encoder_delta)
    assert max(float(np.abs(d).max()) for d in head.encoder_delta.values()) > 1e-4

    stock = SentenceEncoder(max_seq_length=32, layers=1).encode(TEXTS)
    tuned = SentenceEncoder(max_seq_length=32, layers=1, encoder_delta=head.encoder_delta).encode(TEXTS)
    assert np.abs(tuned - stock).max() > 1e-3
    detector = load_value_detector(ValueDetectorConfig(head=tmp_path / "head.npz", quantize=False, max_seq_length=32))
    np.testing.assert_allclose(detector.predict_proba(TEXTS), head.proba(tuned), atol=1e-5)
    # the hf checkpoint built from the head carries the tuned layer too
    hf = HFValueDetector(
        [str(build_value_checkpoint(tmp_path / "ckpt", tmp_path / "head.npz"))],
        max_length=32,
        threshold=0.5,
        trust_remote_code=True,
    )
    np.testing.assert_allclose(hf.predict_proba(TEXTS), head.proba(tuned), atol=1e-4)
