"""A sentence encoder with 20 logistic value heads, as a Hugging Face sequence classifier.

`esvr.models.value_checkpoint.build_value_checkpoint` copies this file, unchanged, into the
checkpoint folder it writes and names it in ``config.json``'s ``auto_map``; transformers then
imports it from the folder (``trust_remote_code=True``), as it imports the custom DeBERTa head of
tum-nlp/Deberta_Human_Value_Detector. It therefore imports nothing but torch and transformers.

The forward pass is what the embedding value detector computes: the encoder's token states are
mean-pooled over the attention mask, L2-normalised when the sentence encoder normalises, and
each value's head gives one logit. The multi-label loss is binary cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class MeanPoolValueConfig(BertConfig):
    # its own model type, so that registering this class for the auto classes touches no other BERT
    model_type = "mean_pool_value_classifier"

    def __init__(self, normalize: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.normalize = normalize


class MeanPoolValueClassifier(BertPreTrainedModel):
    config_class = MeanPoolValueConfig

    def __init__(self, config: MeanPoolValueConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)  # type: ignore[arg-type]  # the config sets it
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(states.shape[:2], dtype=states.dtype, device=states.device)
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if self.config.normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=1)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
        return SequenceClassifierOutput(loss=loss, logits=logits)
