"""BERT with pluggable sparse attention: thin subclasses of transformers' BERT classes.

The only changes to BERT are where attention masks come from and the DAM penalty in the pre-training
losses. Each model owns a mask source (``model.bert.sparse_mask``: a fixed pattern or a learned DAM
mask); once per forward pass it produces the pass's masks, which travel to every attention layer as the
``sparse_masks`` keyword and are applied by :mod:`sparsebert.model.attention`. Any HF BERT checkpoint loads
(``from_pretrained(dir, attention_pattern=..., attention_backend=...)``), and with the dense pattern the
output equals transformers' own ``BertModel``.

A saved config whose pattern is a ``"package.module:function"`` path names code: loading it imports that module
only with ``from_pretrained(dir, trust_remote_code=True)``, transformers' opt-in for a checkpoint's own code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)
from transformers.modeling_outputs import MaskedLMOutput
from transformers.models.bert.modeling_bert import BertForPreTrainingOutput

# `from sparsebert.<module> import <names>` only: the standalone export rewrites these into the relative imports
# transformers' dynamic-module loader follows (sparsebert.model.standalone).
from sparsebert.choices import ATTENTION_BACKENDS, MLM_LOGITS, check
from sparsebert.model.attention import IMPLEMENTATION, choose_backend, effective_dropout
from sparsebert.model.attention import register as register_attention
from sparsebert.model.dam import DamMask
from sparsebert.model.layer_masks import LayerMasks
from sparsebert.model.mask_source import build_mask_source
from sparsebert.model.masks import MaskSpec, code_reference, expand_alpha, is_builtin, parse_spec

register_attention()

# True in a copy that a standalone export ships (sparsebert.model.standalone): such a copy saves its code along.
_SHIPPED = not __name__.startswith("sparsebert.")

# Whether the config being loaded may import the pattern code it names. transformers pops
# ``trust_remote_code`` before it loads a model's config, so the model's ``from_pretrained`` sets this for the
# duration of its load and the config's loader reads it.
_TRUST_REMOTE_CODE: ContextVar[bool] = ContextVar("sparsebert_trust_remote_code", default=False)


@contextmanager
def _trusting(trust_remote_code: bool | None) -> Iterator[None]:
    """Within the block, loaded configs may (True) or may not (False) import pattern code; None inherits."""
    if trust_remote_code is None:
        yield
        return
    token = _TRUST_REMOTE_CODE.set(bool(trust_remote_code))
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def _check_trusted(spec, trust_remote_code: bool) -> None:
    """Refuse a saved pattern that would import a module, unless the caller trusts the checkpoint."""
    name = code_reference(spec)
    if name is None or trust_remote_code:
        return
    module = name.partition(":")[0]
    raise ValueError(
        f"the saved config's attention_pattern {name!r} is code: using it imports module {module!r} and runs "
        "it. If you trust this checkpoint, load it with trust_remote_code=True (SparseBert*.from_pretrained or "
        "SparseBertConfig.from_pretrained; Auto classes: pass config=SparseBertConfig.from_pretrained(dir, "
        "trust_remote_code=True)), or replace the pattern with attention_pattern=..."
    )


class SparseBertConfig(BertConfig):
    """A ``BertConfig`` plus the attention pattern and the attention backend.

    Args:
        attention_pattern: a pattern spec — a name (``"star"``), a dict with parameter overrides
            (``{"name": "longformer", "window": 4}``, ``{"name": "dam_s", "lambda": 1e-4}``) or a
            ``"package.module:function"`` user pattern. See :mod:`sparsebert.model.masks`. A config built in code may
            name any of them; a *loaded* one (``from_pretrained``, ``from_dict``, ``from_json_file``) imports a
            ``"package.module:function"`` pattern only with ``trust_remote_code=True``.
        attention_backend: ``"auto"``, ``"eager"``, ``"sdpa"``, ``"flex"`` or ``"block_sparse"`` (see :mod:`sparsebert.model.attention`).
        mlm_logits: ``"all"`` (default: transformers' outputs) or ``"masked_only"``: when ``labels`` are given,
            the MLM head (transform + vocabulary projection, most of a small BERT's compute) runs only at
            positions whose label is not -100, and ``prediction_logits`` / ``logits`` is ``[num_masked, vocab]``
            (rows in the order of ``labels != -100``) instead of ``[batch, seq, vocab]``. Same loss, less work.
        dam_searched_len: the longest sequence length the DAM mask was searched at (None: not searched, or not a
            DAM mask). Written by the model when the mask is frozen and when it is saved; beyond this length the
            mask follows the extension rule of :func:`sparsebert.model.masks.expand_alpha`.
    """

    model_type = "sparsebert"

    def __init__(
        self,
        attention_pattern="dense",
        attention_backend: str = "auto",
        mlm_logits: str = "all",
        dam_searched_len: int | None = None,
        **kwargs,
    ):
        kwargs.pop("attn_implementation", None)  # always ours; the backend is chosen by attention_backend
        super().__init__(**kwargs)
        check("attention_backend", attention_backend, ATTENTION_BACKENDS)
        check("mlm_logits", mlm_logits, MLM_LOGITS)
        self.attention_pattern = attention_pattern
        self.attention_backend = attention_backend
        self.mlm_logits = mlm_logits
        self.dam_searched_len = dam_searched_len
        self._attn_implementation = IMPLEMENTATION

    def __setattr__(self, key, value):
        # from_pretrained(..., attention_pattern=...) sets attributes directly: validate and normalise here.
        if key == "attention_pattern":
            value = parse_spec(value).to_config()
        super().__setattr__(key, value)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *args, trust_remote_code: bool | None = None, **kwargs
    ):
        """transformers' ``from_pretrained``; ``trust_remote_code=True`` lets the saved pattern import its module."""
        with _trusting(trust_remote_code):
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """A config from saved values: every loader (``from_pretrained``, ``AutoConfig``) comes through here, so
        this is where a saved ``"package.module:function"`` pattern is refused unless trusted."""
        trust_remote_code = kwargs.pop("trust_remote_code", None)
        if "attention_pattern" in kwargs:
            # The caller's own pattern replaces the saved one, which is then never resolved (nor imported).
            config_dict = {**config_dict, "attention_pattern": kwargs["attention_pattern"]}
        else:
            trusted = _TRUST_REMOTE_CODE.get() if trust_remote_code is None else bool(trust_remote_code)
            _check_trusted(config_dict.get("attention_pattern"), trusted)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_json_file(cls, json_file, trust_remote_code: bool | None = None):
        """A config from a JSON file, gated like :meth:`from_dict` (transformers' version bypasses it)."""
        return cls.from_dict(cls._dict_from_json_file(json_file), trust_remote_code=trust_remote_code)

    @property
    def mask_spec(self) -> MaskSpec:
        """``attention_pattern`` as a :class:`~sparsebert.model.masks.MaskSpec` (it is stored validated and complete)."""
        return MaskSpec(
            self.attention_pattern["name"], {k: v for k, v in self.attention_pattern.items() if k != "name"}
        )


class _SparseBertMixin:
    """What every SparseBert class shares: config class, weight init for α, mask access."""

    config_class = SparseBertConfig

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path, *model_args, trust_remote_code: bool | None = None, **kwargs
    ):
        """transformers' ``from_pretrained``; ``trust_remote_code=True`` lets the checkpoint's config import the
        ``"package.module:function"`` pattern it names (refused otherwise, before any of its code runs)."""
        with _trusting(trust_remote_code):
            return super().from_pretrained(
                pretrained_model_name_or_path, *model_args, trust_remote_code=trust_remote_code, **kwargs
            )

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, DamMask):
            # from_pretrained initialises a module with any tensor missing: keep an α that was loaded (a
            # checkpoint saved before the search length was recorded), and take the record from the config.
            if not getattr(module.alpha, "_is_hf_initialized", False):
                module.reset_parameters()
            if not getattr(module.searched_len, "_is_hf_initialized", False):
                module.searched_len.fill_(self.config.dam_searched_len or 0)

    def save_pretrained(self, save_directory, *args, standalone: bool | None = None, **kwargs):
        """transformers' ``save_pretrained``; the config records the DAM mask's searched length first.

        ``standalone=True`` also writes the model code beside the weights and an ``auto_map`` in ``config.json``, so
        that transformers alone loads the folder: ``AutoModelFor…from_pretrained(dir, trust_remote_code=True)``
        (:mod:`sparsebert.model.standalone`). A model loaded from such a folder's code saves it along by default.
        Only the package's own patterns can be shipped: a registered or ``"package.module:function"`` one is an
        error here."""
        self._record_search_length()
        standalone = _SHIPPED if standalone is None else standalone
        if standalone and not is_builtin(self.config.mask_spec):
            raise ValueError(
                f"attention pattern {self.config.mask_spec.name!r} is your own code, which a standalone export cannot "
                "ship: save with standalone=False (loading it then needs sparsebert and that code)"
            )
        from sparsebert.model.standalone import auto_map, write_model_code

        # The code first, so that transformers' own push_to_hub=True takes it along.
        if standalone and kwargs.get("is_main_process", True):
            Path(save_directory).mkdir(parents=True, exist_ok=True)
            write_model_code(save_directory)
        # An auto_map only where the code is written beside it (a loaded export's config holds one).
        saved = vars(self.config).pop("auto_map", None)
        if standalone:
            self.config.auto_map = auto_map()
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            vars(self.config).pop("auto_map", None)
            if saved is not None:
                self.config.auto_map = saved

    def _record_search_length(self) -> None:
        source = self.mask_source
        # On the meta device the model is still being built by a load: the record comes with the weights.
        if not isinstance(source, DamMask) or source.searched_len.is_meta:
            return
        if source.search_length > 0:
            self.config.dam_searched_len = source.search_length

    @property
    def mask_source(self) -> nn.Module:
        """The module producing the masks (``PatternMask`` or ``DamMask``)."""
        return self.base_model.sparse_mask

    def current_mask(self, seq_len: int) -> torch.Tensor:
        """The mask in force, ``[num_layers, num_heads, L, L]`` bool (deterministic: α > 0 for DAM)."""
        hard = self._deterministic_masks(seq_len).hard
        return hard.expand(self.config.num_hidden_layers, -1, -1, -1).clone()

    def attention_in_force(self, seq_len: int, training: bool = True) -> tuple[str, float]:
        """(backend, attention dropout) that a training (or inference) pass at ``seq_len`` runs with on this
        model's device: ``auto`` resolved, and the dropout the backend really applies."""
        dropout = self.config.attention_probs_dropout_prob if training else 0.0
        masks = self._deterministic_masks(seq_len)
        if training and not self.mask_frozen:
            masks = replace(masks, soft=masks.hard.float())  # a search pass hands the backends a soft mask
        backend = choose_backend(
            self.config.attention_backend, masks, self.device, needs_grad=training, dropout=dropout
        )
        return backend, effective_dropout(backend, dropout)

    def _deterministic_masks(self, seq_len: int) -> LayerMasks:
        """The masks of an eval-mode pass (no sampling, so no random numbers drawn)."""
        source = self.mask_source
        was_training = source.training
        source.eval()
        try:
            with torch.no_grad():
                return source.masks(seq_len, self.device)
        finally:
            source.train(was_training)

    def compile_layers(self, **compile_kwargs) -> None:
        """``torch.compile`` every encoder layer in place (``nn.Module.compile``; kwargs go to ``torch.compile``).

        In place, so parameter names (checkpoints, DeepSpeed, export) stay those of the eager model. The layers'
        projections, feed-forward blocks and LayerNorms are compiled; the mask source (DAM's Gumbel sampling,
        its search length, the masks cached per length) runs before the layers and the attention function is
        kept out of the graph (:mod:`sparsebert.model.attention`), so every layer shares one compiled graph and a
        DAM search compiles like a fixed mask. A new sequence length recompiles once (then dynamic shapes).
        """
        for layer in self.base_model.encoder.layer:
            layer.compile(**compile_kwargs)

    def freeze_mask(self, target_sparsity: float | None = None, seq_len: int | None = None) -> float | None:
        """End the DAM search: binarise (α > 0) and fix the mask; the config records it.

        With ``target_sparsity``, α is first shifted by the θ for which the mask at ``seq_len`` (default: the
        searched length) comes closest to it, so the frozen mask 1[α > 0] meets the target; returns θ (None
        without a target). Under ZeRO-3, gather ``mask_source.parameters()`` (modifier rank 0) around the call.
        """
        source = self._dam("freeze")
        theta = None if target_sparsity is None else self.meet_mask_sparsity(target_sparsity, seq_len)
        source.freeze()
        self.config.attention_pattern = {**self.config.attention_pattern, "frozen": True}
        self._record_search_length()
        return theta

    def meet_mask_sparsity(self, target_sparsity: float, seq_len: int | None = None) -> float:
        """Shift α by the θ for which 1[α > θ] at ``seq_len`` (default: the searched length) comes closest to
        ``target_sparsity``, so that the mask 1[α > 0] meets it; returns θ."""
        source = self._dam("threshold")
        return source.meet_sparsity(target_sparsity, seq_len or source.search_length or source.max_len)

    def steer_mask(self, lam: float, target_density: float | None = None) -> None:
        """Set a DAM search's λ and, under a sparsity target, the density the loss term λ·(E[density] −
        target) aims at (None: the paper's λ·‖M‖₁). The trainer's controller calls this before each step."""
        self._dam("steer").steer(lam, target_density)

    @property
    def expected_mask_density(self) -> float | None:
        """E[density] (mean σ(α)) of the last search pass under a sparsity target; None before one."""
        source = self.mask_source
        last = getattr(source, "last_density", None)
        return None if last is None else float(last)

    def _dam(self, what: str) -> DamMask:
        if not isinstance(self.mask_source, DamMask):
            raise ValueError(
                f"attention pattern {self.config.mask_spec.name!r} is not learned (cannot {what} it)"
            )
        return self.mask_source

    @property
    def mask_frozen(self) -> bool:
        """True when the mask is fixed: a pattern always, a DAM mask once frozen (no search left to run)."""
        return self.mask_source.frozen

    @property
    def searching_mask(self) -> bool:
        """True while a DAM mask is sampled (training mode, not frozen)."""
        return self.mask_source.training and not self.mask_frozen

    @property
    def mask_temperature(self) -> float | None:
        """The Gumbel-sigmoid temperature τ of a DAM mask (None for a fixed pattern); settable, to anneal it."""
        return self.mask_source.tau if isinstance(self.mask_source, DamMask) else None

    @mask_temperature.setter
    def mask_temperature(self, tau: float) -> None:
        if not isinstance(self.mask_source, DamMask):
            raise ValueError(f"attention pattern {self.config.mask_spec.name!r} has no temperature")
        self.mask_source.tau = float(tau)

    def mask_importance(self, seq_len: int) -> torch.Tensor:
        """σ(α) per position, ``[num_layers, num_heads, L, L]``: how much the search wants each position kept
        (the paper's importance). Under ZeRO-3, gather ``mask_source.parameters()`` around the call."""
        source = self._dam("read the importance of")
        importance = torch.sigmoid(
            expand_alpha(
                source.name, source.alpha.detach().float(), seq_len, source.search_length, source.block
            )
        )
        return importance.expand(self.config.num_hidden_layers, source.num_heads, -1, -1).clone()


class SparseBertModel(_SparseBertMixin, BertModel):
    """``BertModel`` whose attention follows ``config.attention_pattern``."""

    def __init__(self, config: SparseBertConfig, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        self.sparse_mask = build_mask_source(config)

    def masks_for(self, input_ids=None, inputs_embeds=None) -> LayerMasks:
        """Sample (DAM search) or fetch (fixed mask) the masks for one forward pass."""
        reference = input_ids if input_ids is not None else inputs_embeds
        if reference is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        return self.sparse_mask.masks(reference.shape[1], reference.device)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        *args,
        sparse_masks: LayerMasks | None = None,
        document_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        """``BertModel``'s forward; ``document_ids`` (``[B, L]`` ints) keeps attention inside each document of a
        packed sample: a query attends a key only where their ids are equal (every backend, DAM search too)."""
        if sparse_masks is None:
            sparse_masks = self.masks_for(input_ids, inputs_embeds)
        with_documents(sparse_masks, document_ids)
        return super().forward(
            input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, *args,
            sparse_masks=sparse_masks, **kwargs,
        )  # fmt: skip


def with_documents(masks: LayerMasks, document_ids: torch.Tensor | None) -> LayerMasks:
    """``masks`` (this pass's own) with the batch's document ids, checked against the mask's length."""
    if document_ids is not None:
        if document_ids.dim() != 2 or document_ids.shape[1] != masks.seq_len:
            raise ValueError(
                f"document_ids must be [batch, {masks.seq_len}] (one id per token), got {tuple(document_ids.shape)}"
            )
        masks.documents = document_ids
    return masks


class _SparseBertHeads(_SparseBertMixin):
    """Head models: transformers' head on top of a :class:`SparseBertModel`."""

    def __init__(self, config: SparseBertConfig):
        super().__init__(config)
        # transformers' __init__ built a plain BertModel; swap in ours (same weights' names and shapes).
        # Under from_pretrained this all happens on the meta device, so the first build costs nothing.
        self.bert = SparseBertModel(config, add_pooling_layer=self.bert.pooler is not None)
        self.post_init()


@dataclass
class SparseBertForPreTrainingOutput(BertForPreTrainingOutput):
    """``BertForPreTrainingOutput`` plus its loss terms, each reported on its own."""

    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    mask_penalty: torch.Tensor | None = None


@dataclass
class SparseBertMaskedLMOutput(MaskedLMOutput):
    mlm_loss: torch.Tensor | None = None
    mask_penalty: torch.Tensor | None = None


def _masked_only(config: SparseBertConfig, labels: torch.Tensor | None) -> bool:
    """Whether this pass computes MLM logits only where a label is set (``config.mlm_logits``)."""
    return labels is not None and getattr(config, "mlm_logits", "all") == "masked_only"


def _encode_masked_only(model, inputs: tuple, masks: LayerMasks, labels: torch.Tensor, head, **kwargs):
    """The encoder pass, and the MLM ``head`` applied only where a label is set: (encoder output, logits
    ``[num_masked, vocab]``, the labels there) — the ``mlm_logits="masked_only"`` path of both MLM models."""
    out = model.bert(*inputs, sparse_masks=masks, return_dict=True, **kwargs)
    selected = labels != -100
    return out, head(out.last_hidden_state[selected]), labels[selected]


def _total(*terms: torch.Tensor | None) -> torch.Tensor | None:
    present = [t for t in terms if t is not None]
    return sum(present[1:], present[0]) if present else None


class SparseBertForPreTraining(_SparseBertHeads, BertForPreTraining):
    """MLM + NSP, as BERT; while DAM searches the loss also holds λ·‖M‖₁ (``mask_penalty``)."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        next_sentence_label=None,
        document_ids=None,
        **kwargs,
    ):
        masks = with_documents(self.bert.masks_for(input_ids, inputs_embeds), document_ids)
        inputs = (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        if _masked_only(self.config, labels):
            out, prediction_logits, labels = _encode_masked_only(
                self, inputs, masks, labels, self.cls.predictions, **kwargs
            )
            seq_relationship_logits = self.cls.seq_relationship(out.pooler_output)
        else:
            out = super().forward(*inputs, sparse_masks=masks, **kwargs)
            prediction_logits, seq_relationship_logits = out.prediction_logits, out.seq_relationship_logits
        ce = nn.functional.cross_entropy
        mlm = None if labels is None else ce(prediction_logits.flatten(0, -2).float(), labels.flatten())
        nsp = (
            None if next_sentence_label is None else ce(seq_relationship_logits.float(), next_sentence_label)
        )
        penalty = masks.penalty
        loss = _total(mlm, nsp, penalty) if (mlm is not None or nsp is not None) else None
        return SparseBertForPreTrainingOutput(
            loss=loss,
            prediction_logits=prediction_logits,
            seq_relationship_logits=seq_relationship_logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            mlm_loss=mlm,
            nsp_loss=nsp,
            mask_penalty=penalty,
        )


class SparseBertForMaskedLM(_SparseBertHeads, BertForMaskedLM):
    """Masked LM; while DAM searches the loss also holds λ·‖M‖₁ (``mask_penalty``)."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        document_ids=None,
        **kwargs,
    ):
        masks = with_documents(self.bert.masks_for(input_ids, inputs_embeds), document_ids)
        inputs = (input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds)
        if _masked_only(self.config, labels):
            out, logits, selected_labels = _encode_masked_only(
                self, inputs, masks, labels, self.cls, **kwargs
            )
            mlm = nn.functional.cross_entropy(logits, selected_labels)
        else:
            out = super().forward(*inputs, labels=labels, sparse_masks=masks, **kwargs)
            logits, mlm = out.logits, out.loss
        penalty = masks.penalty
        return SparseBertMaskedLMOutput(
            loss=_total(mlm, penalty) if mlm is not None else None,
            logits=logits,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            mlm_loss=mlm,
            mask_penalty=penalty,
        )


class _FixedMaskHeads(_SparseBertHeads):
    """Fine-tuning heads: as in the paper, they train with the fixed mask; a DAM mask is frozen here."""

    def __init__(self, config: SparseBertConfig):
        super().__init__(config)
        if not self.mask_frozen:
            self.freeze_mask()  # α is loaded later by from_pretrained; the frozen mask is derived from it lazily


class SparseBertForSequenceClassification(_FixedMaskHeads, BertForSequenceClassification):
    """Sequence classification / regression (GLUE) with the checkpoint's (frozen) mask."""


class SparseBertForQuestionAnswering(_FixedMaskHeads, BertForQuestionAnswering):
    """Span extraction (SQuAD) with the checkpoint's (frozen) mask."""
