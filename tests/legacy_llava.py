"""A LLaVA-Next with the module tree of transformers < 4.52, for testing vlens on both layouts.

Older transformers built `LlavaNextForConditionalGeneration` as
`vision_tower`, `multi_modal_projector`, `image_newline` and
`language_model` (a `MistralForCausalLM`: `.model.layers`, `.model.norm`,
`.lm_head`) directly on the top module, and decoder layers returned tuples
`(hidden_states, ...)`. transformers 5 no longer ships that class, so this
file rebuilds that tree from a transformers-5 model's weights; forward
computes exactly what the transformers-5 model computes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llava_next.modeling_llava_next import LlavaNextPreTrainedModel
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer


class TupleDecoderLayer(MistralDecoderLayer):
    """A decoder layer returning `(hidden_states,)`, as before transformers 4.52."""

    def forward(self, hidden_states, **kwargs):  # type: ignore[override]
        return (super().forward(hidden_states, **kwargs),)


class LegacyTextModel(nn.Module):
    def __init__(self, donor) -> None:
        super().__init__()
        cfg = donor.config
        self.config = cfg
        self.embed_tokens = donor.embed_tokens
        self.layers = nn.ModuleList()
        for i, layer in enumerate(donor.layers):
            new = TupleDecoderLayer(cfg, i)
            new.load_state_dict(layer.state_dict())
            self.layers.append(new)
        self.norm = donor.norm
        self.rotary_emb = donor.rotary_emb

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None):
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=None, position_ids=position_ids,
        )
        pe = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pe)[0]
        return self.norm(h)


class LegacyCausalLM(nn.Module):
    def __init__(self, donor_lm, lm_head) -> None:
        super().__init__()
        self.model = LegacyTextModel(donor_lm)
        self.lm_head = lm_head


class LegacyLlavaNext(LlavaNextPreTrainedModel, GenerationMixin):
    """Old-layout LLaVA-Next sharing the weights of a transformers-5 `donor` model."""

    def __init__(self, donor) -> None:
        super().__init__(donor.config)
        self.vision_tower = donor.model.vision_tower
        self.multi_modal_projector = donor.model.multi_modal_projector
        self.image_newline = donor.model.image_newline
        self.language_model = LegacyCausalLM(donor.model.language_model, donor.lm_head)
        object.__setattr__(self, "_donor", donor)  # not a submodule: used for its image-feature code only

    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None, **_):
        embeds = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is not None:
            feats = self._donor.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
            feats = torch.cat(feats).to(embeds)
            embeds = embeds.masked_scatter((input_ids == self.config.image_token_id)[..., None], feats)
        h = self.language_model.model(embeds, attention_mask=attention_mask, position_ids=position_ids)
        return CausalLMOutputWithPast(logits=self.language_model.lm_head(h))


# The old class had this very name; pipelines and logs recognise it by name.
LegacyLlavaNext.__name__ = LegacyLlavaNext.__qualname__ = "LlavaNextForConditionalGeneration"
