"""LlavaLiteModel: a vision tower and a projector feeding any transformers causal LM.

Each image placeholder in the text has already been expanded (by the processor, `llava_lite.data.processor`) to
as many copies of the `<image>` token id as that image takes (a real row of the embedding, never a negative
sentinel). Here the embeddings of those positions are replaced by the projected image features in one
`masked_scatter`: images in the batch are taken in order, and their features fill the image positions in
row-major token order. The features come from the tower (`pixel_values`), or were computed before
(`image_features`: the tower's output, e.g. cached for a fixed dataset).

In training (and in any distributed run) a text-only batch still runs the tower and the projector, on one blank
image whose result enters the embeddings with weight zero: every rank of a run then runs the same modules every
step, so DDP needs no search for unused parameters, and ZeRO-3 and FSDP gather the same weights on every rank
(a rank that skipped them would leave the others waiting). The loss and every gradient are unchanged.

Under the AnyRes layout an image is several views (`[views, 3, H, W]`, with its `image_sizes` entry): the tower
runs on every view of the batch at once, the projector on every view's features, and each image's views become
one sequence (`llava_lite.data.anyres`: tiles in place, padding removed, the projector's newline after each row),
whose length is the count the processor gave.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast, ModelOutput

from llava_lite.data.templates import template_special_tokens
from llava_lite.model.attention import attending_by_segments, shares_prefixes, use_varlen_sdpa
from llava_lite.model.config import ModelConfig
from llava_lite.model.hf_llava import is_hf_llava_folder, load_hf_llava
from llava_lite.model.image_layout import image_geometry
from llava_lite.model.language_model import (
    add_special_tokens,
    build_language_model,
    fit_embeddings,
    prepare_tokenizer,
)
from llava_lite.model.loss import (
    body_and_head,
    head_matches,
    sequence_log_probs,
    sequence_log_probs_from_logits,
    trained_positions_loss,
)
from llava_lite.model.projector import Projector, projector_for
from llava_lite.model.prompt_learning import (
    generate_with_virtual_tokens,
    lm_position_ids,
    prompt_learning_config,
    virtual_tokens,
)
from llava_lite.model.saving import load_model, save_model
from llava_lite.model.vision import VisionTower, build_vision_tower
from llava_lite.model.weights_files import require_safetensors_folder

logger = logging.getLogger(__name__)

# Pixels or tower features of a batch's images: one tensor when all share a shape, else one tensor per image.
Images = torch.Tensor | list[torch.Tensor]


@dataclass
class SequenceLogProbs(ModelOutput):
    """What `forward(..., sequence_log_probs=True)` returns: each sequence's summed log-probability of its labelled
    tokens (`[sequences]`, float32), and the tower's features of the batch's images when this pass computed them
    (so that a second pass over the same images, a reference model's, need not run the tower again)."""

    logps: torch.Tensor | None = None
    image_features: Images | None = None


class LlavaLiteModel(nn.Module):
    # For transformers' Trainer: labels are shifted inside the LM, so it counts targets over labels[..., 1:].
    loss_type = "ForCausalLM"

    def __init__(
        self,
        config: ModelConfig,
        vision_tower: VisionTower,
        projector: Projector,
        language_model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.projector = projector
        self.language_model = language_model
        use_varlen_sdpa(self.base_language_model)
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        # How the loss meets the LM head (llava_lite.model.loss): "chunked" or "liger" only where a label is,
        # "full" the LM's own head over every position.
        self.loss_kernel = "chunked"
        self._split = self._split_for = None
        self.anyres = image_geometry(config).anyres if config.vision_tower.image_layout == "anyres" else None

    # ----- building and loading -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig) -> LlavaLiteModel:
        """A new model: tower and LM as the config names them, a freshly initialised projector."""
        tokenizer, new_ids = prepare_tokenizer(config)
        if config.language_model.name:
            require_safetensors_folder(config.language_model.name, "language model")  # a local folder: no pickle
        language_model = build_language_model(config.language_model)
        fit_embeddings(language_model, tokenizer, new_ids)
        vision_tower = build_vision_tower(config.vision_tower)
        projector = projector_for(config, vision_tower.hidden_size, language_model.get_input_embeddings().embedding_dim)
        return cls(config, vision_tower, projector, language_model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        trainable_adapters: bool = False,
        quantization: str | None = None,
        dtype: str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> LlavaLiteModel:
        """Load a folder written by `save_pretrained` (see `llava_lite.model.saving` for its layout), or a
        transformers Llava folder (see `llava_lite.model.hf_llava`). `quantization` (4bit, 8bit) loads the LM
        quantized, as QLoRA trains it; `dtype` and `attn_implementation` override how the folder says to load it.
        `trust_remote_code` lets code that came with a run folder run; only the person running the command may give
        it, never the folder."""
        if is_hf_llava_folder(folder):
            if quantization not in (None, "none") or dtype or attn_implementation:
                raise ValueError(
                    f"{folder}: a transformers Llava folder loads as it is saved; it cannot be loaded quantized or "
                    "with another dtype or attn_implementation"
                )
            return cls(*load_hf_llava(folder))
        overrides = {"dtype": dtype, "attn_implementation": attn_implementation}
        return cls(
            *load_model(folder, trainable_adapters, quantization, overrides, trust_remote_code=trust_remote_code)
        )

    def save_pretrained(self, folder: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """What was trained and what exists nowhere else, as safetensors and JSON; no pickle anywhere."""
        save_model(self, folder, state_dict)

    def set_chat_template(self, name: str) -> list[int]:
        """Switch template (stage 1 trains with `plain`, stage 2 with a chat template); returns added token ids."""
        new_ids = self.add_template_tokens(name)
        self.config.chat_template = name
        return new_ids

    def add_template_tokens(self, name: str) -> list[int]:
        """Add the marker tokens template `name` needs (rows start at the mean); returns the ids added."""
        new_ids = add_special_tokens(self.tokenizer, list(template_special_tokens(name, self.tokenizer)))
        if new_ids:
            fit_embeddings(self.base_language_model, self.tokenizer, new_ids)
        return new_ids

    @property
    def uses_adapters(self) -> bool:
        return hasattr(self.language_model, "peft_config")

    @property
    def base_language_model(self) -> PreTrainedModel:
        """The transformers model itself, under any peft wrapping."""
        return self.language_model.get_base_model() if self.uses_adapters else self.language_model

    @property
    def _no_split_modules(self) -> list[str]:
        """The block classes FSDP wraps as units (accelerate's transformer-based wrapping reads this): the LM's
        decoder layers. The tower and projector stay in the root unit, which every rank gathers every step."""
        return list(getattr(self.base_language_model, "_no_split_modules", None) or [])

    @property
    def context_length(self) -> int | None:
        """The most positions the LM takes, when its config says (less any virtual tokens of prompt learning)."""
        positions = getattr(self.base_language_model.config, "max_position_embeddings", None)
        return positions - virtual_tokens(self.language_model) if positions else positions

    # ----- forward ---------------------------------------------------------------------------
    def train(self, mode: bool = True) -> LlavaLiteModel:
        super().train(mode)
        self.vision_tower.train(mode)  # a frozen tower refuses to leave eval mode
        return self

    def image_features(self, pixel_values: Images) -> Images:
        """The tower's features: `[images, tokens, tower_hidden]`, or one `[tokens, tower_hidden]` per image when
        the images differ in shape (each shape runs through the tower as one batch). Under AnyRes, one
        `[views, tokens, tower_hidden]` per image, every view of the batch through the tower at once."""
        if self.anyres is not None:
            views = list(pixel_values)
            features = self.vision_tower(torch.cat(views))
            return list(features.split([v.shape[0] for v in views]))
        if torch.is_tensor(pixel_values):
            return self.vision_tower(pixel_values)
        features: list[torch.Tensor | None] = [None] * len(pixel_values)
        by_shape: dict[tuple, list[int]] = {}
        for index, image in enumerate(pixel_values):
            by_shape.setdefault(tuple(image.shape), []).append(index)
        for indices in by_shape.values():
            out = self.vision_tower(torch.stack([pixel_values[i] for i in indices]))
            for i, feature in zip(indices, out):
                features[i] = feature
        return features

    def project(self, image_features: Images, image_sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Tower features to LM embeddings, every image's tokens one after another: `[tokens, lm_hidden]`."""
        return _flat(self.project_each(image_features, image_sizes))

    def project_each(self, image_features: Images, image_sizes: torch.Tensor | None = None) -> Images:
        """Tower features to LM embeddings, per image: `[images, tokens, lm_hidden]`, or one `[tokens, lm_hidden]`
        per image (always under AnyRes, which needs each image's (height, width) in `image_sizes`)."""
        # Dtypes are read from the parameter lists: reading `module.weight` here, outside that module's forward,
        # would make DeepSpeed ZeRO-3 gather a partitioned weight on this rank alone.
        dtype = _dtype_of(self.projector)
        out_dtype = _dtype_of(self.language_model.get_input_embeddings())
        if self.anyres is not None:
            if image_sizes is None or len(image_sizes) != len(image_features):
                raise ValueError("the anyres layout needs image_sizes, one (height, width) per image")
            sizes = image_sizes.tolist() if torch.is_tensor(image_sizes) else image_sizes  # one read, not per image
            # One projector pass over every view of the batch: under ZeRO-3 each pass gathers the projector's
            # weights, so every rank makes exactly one, whatever its images (a text-only batch's blank image too).
            views = [f.shape[0] for f in image_features]
            projected = self.projector(torch.cat(list(image_features)).to(dtype)).split(views)
            newline = self.projector.image_newline  # after the pass, as the blank image reads it
            return [
                self.anyres.pack(p, tuple(map(int, size)), newline).to(out_dtype) for p, size in zip(projected, sizes)
            ]
        if torch.is_tensor(image_features):
            return self.projector(image_features.to(dtype)).to(out_dtype)
        if self.projector.pixel_shuffle == 1:  # a token-wise MLP: images of any token counts in one pass
            counts = [f.shape[0] for f in image_features]
            flat = self.projector(torch.cat(list(image_features)).to(dtype)).to(out_dtype)
            return list(flat.split(counts))
        return [self.projector(f[None].to(dtype))[0].to(out_dtype) for f in image_features]

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: Images | None = None,
        image_tokens: torch.Tensor | None = None,
        image_features: Images | None = None,
        image_sizes: torch.Tensor | None = None,
        image_order: torch.Tensor | None = None,
        tower_output: list | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image's projected features in its slots. Give `pixel_values` or
        `image_features` (the tower's output), not both; `image_tokens` (each image's slot count, from the
        processor) is checked against the projected features when given. `image_order` says which of the images
        fills each image block of the text, in token order (a preference pair's two answers share their prompt's
        images); by default each image fills one block, in order. The tower's features of `pixel_values` are
        appended to `tower_output` when it is given (a second pass over the same images need not run the tower).

        The modules run in one order whatever the batch holds - embeddings, tower, projector - as ZeRO-3 gathers
        their weights in the order they run, the same on every process."""
        if pixel_values is not None and image_features is not None:
            raise ValueError("give pixel_values or image_features, not both")
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_positions = input_ids == self.image_token_id
        slots = int(image_positions.sum())
        if pixel_values is None and image_features is None:
            _check_slots([], slots, image_tokens)
            if self.training or _distributed():
                return self._with_blank_image(embeds)
            return embeds  # text-only inference: the tower is not run at all
        if image_features is None:
            image_features = self.image_features(pixel_values)
            if tower_output is not None:
                tower_output.append(image_features)
        projected = self.project_each(image_features, image_sizes)
        if image_order is not None:
            projected = (
                projected[image_order] if torch.is_tensor(projected) else [projected[i] for i in image_order.tolist()]
            )
        _check_slots(projected, slots, image_tokens)
        return embeds.masked_scatter(image_positions.unsqueeze(-1), _flat(projected))

    def _with_blank_image(self, embeds: torch.Tensor) -> torch.Tensor:
        """`embeds` unchanged, but tied to one blank image's pass through the tower and projector (weight zero)."""
        blank = embeds.new_zeros(1, 3, *self.vision_tower.image_size)
        features = self.vision_tower(blank)  # one view, whatever the layout
        used = self.projector(features.to(_dtype_of(self.projector))).sum()
        newline = getattr(self.projector, "image_newline", None)  # AnyRes: used only between rows of tiles
        if newline is not None:
            used = used + newline.sum()
        return embeds + used * 0.0

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: Images | None = None,
        image_tokens: torch.Tensor | None = None,
        image_features: Images | None = None,
        image_sizes: torch.Tensor | None = None,
        cu_seq_lens: torch.Tensor | None = None,
        image_order: torch.Tensor | None = None,
        segment_prefixes: torch.Tensor | None = None,
        sequence_log_probs: bool = False,
        objective=None,
        **kwargs,
    ):
        """`kwargs` reach the LM: `num_items_in_batch` from the Trainer makes the loss a sum over the
        accumulated batches' target tokens divided by their count, not a mean of micro-batch means.

        `objective` (with `labels`) replaces the loss: it is called here on the embedded batch as
        `objective(model, input_ids, inputs_embeds, labels, split, **lm_inputs)`, `split` being the LM's (body,
        head) or None (see `llava_lite.train.regularizers`), and returns the output. It runs the LM inside this
        forward because engines that shard weights (DeepSpeed ZeRO-3, FSDP) hold a weight whole only there: a head
        read after the forward would be a placeholder or a shard.

        With `labels`, the loss is computed only where a label is (see `llava_lite.model.loss`) and no logits are
        returned, unless `loss_kernel` is "full" or the LM cannot split body and head. Packed rows
        (one row, no attention mask, position ids restarting per sample) keep their samples apart: `cu_seq_lens`,
        the samples' cumulative lengths, reach the LM's attention as variable-length boundaries (flash attention,
        `llava_lite.model.attention` under sdpa); and no KV cache is made here, so transformers also reads the
        restarts as boundaries wherever an attention takes a mask. `segment_prefixes` (one per packed sample: the
        earlier sample it continues, or -1) let samples share a prefix (`llava_lite.model.attention`); only an LM
        that runs `sdpa_varlen` takes them.

        With `sequence_log_probs` (and `labels`), the result is a `SequenceLogProbs`: each sequence's (row's, or
        packed sample's) summed log-probability of its labelled tokens, from the head at those positions only, and
        the tower's features of `pixel_values`. `image_order` is `embed`'s."""
        if sequence_log_probs and labels is None:
            raise ValueError("sequence_log_probs needs labels: the tokens whose log-probabilities are summed")
        tower_output = [] if sequence_log_probs else None
        inputs_embeds = self.embed(
            input_ids, pixel_values, image_tokens, image_features, image_sizes, image_order, tower_output
        )
        if tower_output:
            image_features = tower_output[0]
        kwargs.setdefault("use_cache", False)  # a forward pass needs no cache (`generate` makes its own)
        # The loss's split of the LM is probed (once, on a few tokens of their own) before any packed forward.
        split = self._body_and_head() if labels is not None and self.loss_kernel != "full" else None
        if objective is not None and labels is None:
            raise ValueError("an objective needs labels")
        if sequence_log_probs:
            kwargs["sequences"] = cu_seq_lens
        segments = nullcontext()
        if segment_prefixes is not None:
            if cu_seq_lens is None or not shares_prefixes(self.language_model):
                raise ValueError(
                    "segment_prefixes need a packed batch (cu_seq_lens) and an LM whose attention is sdpa_varlen, "
                    f"not {getattr(self.language_model.config, '_attn_implementation', None)}"
                )
            kwargs["segment_prefixes"] = segment_prefixes
        if cu_seq_lens is not None:
            longest = int((cu_seq_lens[1:] - cu_seq_lens[:-1]).max())
            kwargs.update(
                cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=longest, max_length_k=longest
            )
            segments = attending_by_segments()
        with segments:
            if objective is not None:
                lm_inputs = {"attention_mask": attention_mask, "position_ids": position_ids, **kwargs}
                return objective(self, input_ids, inputs_embeds, labels, split, **lm_inputs)
            outputs = self._language_model_forward(inputs_embeds, attention_mask, position_ids, labels, split, **kwargs)
        if sequence_log_probs:
            outputs.image_features = image_features
        return outputs

    def _language_model_forward(self, inputs_embeds, attention_mask, position_ids, labels, split, **kwargs):
        """The LM on the embedded batch: with `split` (its body and head), the loss only where trained. With a
        `sequences` keyword (None, or a packed batch's cu_seq_lens), each sequence's log-probability instead."""
        per_sequence = "sequences" in kwargs
        sequences = kwargs.pop("sequences", None)
        if labels is not None and split is not None:
            body, head = split
            num_items_in_batch = kwargs.pop("num_items_in_batch", None)
            hidden = body(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            ).last_hidden_state
            if per_sequence:
                return SequenceLogProbs(logps=sequence_log_probs(hidden, head, labels, sequences))
            loss = trained_positions_loss(hidden, head, labels, num_items_in_batch, self.loss_kernel)
            return CausalLMOutputWithPast(loss=loss)
        if per_sequence:
            kwargs.pop("num_items_in_batch", None)
            logits = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=lm_position_ids(self.language_model, position_ids),
                **kwargs,
            ).logits
            return SequenceLogProbs(logps=sequence_log_probs_from_logits(logits, labels, sequences))
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=lm_position_ids(self.language_model, position_ids),
            labels=labels,
            **kwargs,
        )

    def _body_and_head(self):
        """The LM's body and head when its logits are exactly `head(body(...))` (checked once per LM)."""
        if self._split_for != id(self.language_model):
            split = body_and_head(self.language_model)
            if split is not None and not head_matches(self.language_model, *split):
                split = None
            if split is None:
                logger.info(
                    "%s: the loss uses the LM's own head over every position (its logits are not its output "
                    "head on its last hidden state)",
                    type(self.base_language_model).__name__,
                )
            self._split, self._split_for = split, id(self.language_model)  # an id: a module would register
        return self._split

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: Images | None = None,
        image_tokens: torch.Tensor | None = None,
        image_features: Images | None = None,
        image_sizes: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Token ids of the answers only: the LM's own `generate` (KV cache, sampling, stopping) on our embeddings."""
        inputs_embeds = self.embed(input_ids, pixel_values, image_tokens, image_features, image_sizes)
        if prompt_learning_config(self.language_model) is not None:  # peft's generate would drop the images
            return generate_with_virtual_tokens(self.language_model, inputs_embeds, attention_mask, **kwargs)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **kwargs)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Recompute the LM's activations in the backward pass (the Trainer calls this for activation_checkpointing)."""
        self.base_language_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, **kwargs
        )
        # With a frozen embedding layer the checkpointed blocks would get no input that requires grad.
        self.base_language_model.enable_input_require_grads()

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.base_language_model.is_activation_checkpointing


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _flat(per_image: Images) -> torch.Tensor:
    return per_image.flatten(0, 1) if torch.is_tensor(per_image) else torch.cat(list(per_image))


def _check_slots(image_features: Images, slots: int, image_tokens: torch.Tensor | None) -> None:
    """Every image's projected features fill exactly its own slots: the counts the processor gave, and the
    batch's slots."""
    per_image = (
        [image_features.shape[1]] * image_features.shape[0]
        if torch.is_tensor(image_features)
        else [f.shape[0] for f in image_features]
    )
    if sum(per_image) != slots:
        raise ValueError(
            f"the batch has {slots} image tokens but {len(per_image)} image(s) giving {sum(per_image)} features; "
            "every <image> placeholder needs exactly one image"
        )
    if image_tokens is not None:
        expected = image_tokens.tolist() if torch.is_tensor(image_tokens) else [int(n) for n in image_tokens]
        if expected != per_image:
            raise ValueError(
                f"image features do not fit their slots: {per_image} features per image, but the processor "
                f"made {expected} slots"
            )
