"""Entering a Llama-like decoder in the middle: run its layers from a cached hidden state, optionally with a prompt
prefix every row shares computed once (the frozen-prefix cache and the shared-prefix speed paths use this).

transformers has no API to start the stack at layer k, so `run_stack` repeats what LlamaModel.forward does
(transformers 5): positions 0..T-1, the causal + padding mask from `create_causal_mask` for the model's attention
implementation (a sliding-window one for sliding layers), rotary embeddings from `rotary_emb` (per layer type where
it takes one, as Gemma3's does), then each decoder layer. The speed paths check it against the
model's own forward at start-up and switch themselves off where it differs (training/speed_check.py).

Two pieces are generic instead, taken from the model's own forward: `layer_input` (the hidden states entering
layer k, whatever the embeddings do: scaling, positions) and `head_logits` (the LM head with the model's own
post-processing: logit scaling, soft-capping).
"""

from __future__ import annotations

from typing import Any

from ..data.chat import Encoded, common_prefix_length
from ..modeling import cache_keyword, decoder_layers, params, unwrap_lm


def decoder_parts(lm: Any) -> Any | None:
    """The decoder of a Llama-like causal LM (embed_tokens, layers, norm, rotary_emb), or None if it is not one."""
    dec = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if dec is None or not all(hasattr(dec, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return None
    return dec


def run_layers(layers: Any, hidden: Any, masks: list[Any], position_embeddings: list[Any], position_ids: Any,
               cache: Any = None) -> Any:
    """Call decoder layers directly, layer i with `masks[i]` and `position_embeddings[i]`, passing the KV cache under
    the keyword this transformers version takes (`cache` from 5.x on, `past_key_values` before)."""
    if not layers:
        return hidden
    kw = {cache_keyword(type(layers[0]).forward): cache}
    for layer, mask, pe in zip(layers, masks, position_embeddings):
        hidden = layer(hidden, attention_mask=mask, position_embeddings=pe, position_ids=position_ids,
                       use_cache=cache is not None, **kw)
    return hidden


def causal_mask(dec: Any, hidden: Any, attention_mask: Any, position_ids: Any, explicit: bool = False,
                sliding: bool = False) -> Any:
    """The decoder's causal + padding mask for `hidden` (its sliding-window mask with `sliding`), as its forward
    builds it (no cache). `explicit`: never let SDPA replace the mask by is_causal (a mask that will be sliced
    must exist)."""
    from transformers import masking_utils

    make = masking_utils.create_sliding_window_causal_mask if sliding else masking_utils.create_causal_mask
    names = params(make)
    kw: dict[str, Any] = {cache_keyword(make): None}
    if explicit and "allow_is_causal_skip" in names:
        kw["allow_is_causal_skip"] = False
    if "cache_position" in names:  # transformers 4.x
        kw["cache_position"] = position_ids[0]
    return make(config=dec.config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                **kw)


def layer_type(config: Any, layer: Any) -> str:
    """A decoder layer's attention type as its decoder's forward reads it: `config.layer_types[layer index]`
    ('full_attention' when the config has none or the layer does not say its index)."""
    types = getattr(config, "layer_types", None)
    idx = getattr(layer, "layer_idx", getattr(getattr(layer, "self_attn", None), "layer_idx", None))
    if types and isinstance(idx, int) and 0 <= idx < len(types):
        return str(types[idx])
    return getattr(layer, "attention_type", None) or "full_attention"


def layer_inputs(dec: Any, layers: list[Any], hidden: Any, attention_mask: Any, position_ids: Any,
                 explicit: bool) -> tuple[list[Any], list[Any]]:
    """Per layer, its attention mask and rotary embedding as the decoder's forward makes them: one of each per
    attention type (`layer_type`: Gemma3's and Qwen2's sliding layers get a sliding-window mask, and Gemma3's rotary
    embedding takes the layer type), one for all layers otherwise."""
    types = [layer_type(dec.config, layer) for layer in layers]
    by_type = "layer_type" in params(type(dec.rotary_emb).forward)
    masks, rotary = {}, {}
    for t in dict.fromkeys(types):
        masks[t] = causal_mask(dec, hidden, attention_mask, position_ids, explicit, sliding=t == "sliding_attention")
        rotary[t] = (dec.rotary_emb(hidden, position_ids, t) if by_type
                     else dec.rotary_emb(hidden, position_ids=position_ids))
    return [masks[t] for t in types], [rotary[t] for t in types]


def run_stack(dec: Any, layers: list[Any], hidden: Any, attention_mask: Any, shared: int = 0) -> Any:
    """Hidden states of right-padded rows after `layers` of a Llama-like decoder `dec` (no final norm), from
    their input `hidden` ([B, T, H]); see the module docstring.

    `shared` > 0: the first `shared` tokens are the same in every row (the chat template's system prompt and user
    header). They are run through the layers once, for row 0 only, with a DynamicCache; the cache is repeated over
    the batch and the rest of every row attends to it, as in generation with a cached prompt prefix. Autograd
    flows through the cached keys and values, so gradients are those of the full batch (summed over rows).
    """
    import torch

    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    impl = getattr(dec.config, "_attn_implementation", None)
    masks, rotary = layer_inputs(dec, layers, hidden, attention_mask, position_ids, explicit=shared > 0)
    if shared <= 0 or impl not in ("eager", "sdpa") or not all(torch.is_tensor(m) and m.dim() == 4 for m in masks):
        return run_layers(layers, hidden, masks, rotary, position_ids)
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=dec.config)
    except TypeError:  # older transformers: layers are created on first update
        cache = DynamicCache()
    head = run_layers(layers, hidden[:1, :shared], [m[:1, :, :shared, :shared] for m in masks],
                      [(cos[:, :shared], sin[:, :shared]) for cos, sin in rotary], position_ids[:, :shared], cache)
    cache.batch_repeat_interleave(hidden.shape[0])
    tail = run_layers(layers, hidden[:, shared:], [m[:, :, shared:, :] for m in masks],
                      [(cos[:, shared:], sin[:, shared:]) for cos, sin in rotary], position_ids[:, shared:], cache)
    return torch.cat([head.expand(hidden.shape[0], -1, -1), tail], dim=1)


def forward_from_layer(lm: Any, hidden: Any, attention_mask: Any, start: int, shared: int = 0) -> Any:
    """Final-norm hidden states of a Llama-like decoder, from the input of layer `start` (see run_stack)."""
    dec = lm.get_decoder()
    return dec.norm(run_stack(dec, list(dec.layers[start: dec.config.num_hidden_layers]), hidden, attention_mask,
                              shared))


class _Stop(Exception):
    """Raised by `layer_input`'s hook to end the forward pass at the layer it captured."""


def layer_input(lm: Any, start: int, input_ids: Any, attention_mask: Any) -> Any:
    """The hidden states entering decoder layer `start`, from the model's own forward (stopped there): whatever the
    model does before that layer (embedding scale, absolute positions, ...) is included."""
    layer = decoder_layers(lm)[start]
    box: list[Any] = []

    def hook(_mod: Any, args: tuple, kwargs: dict) -> None:
        box.append(args[0] if args else kwargs["hidden_states"])
        raise _Stop

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"the forward pass of {type(lm).__name__} never reached decoder layer {start}")
    return box[0]


def head_logits(lm: Any, hidden: Any) -> Any:
    """Logits of final-norm hidden states `hidden` ([..., H]) through the model's own head: its forward runs with
    the decoder replaced by one that returns `hidden`, so any post-processing after the LM head (Granite's
    logits_scaling, Gemma's final soft-capping, Cohere's logit_scale) is applied as the model applies it."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Out

    mods = [getattr(lm, getattr(lm, "base_model_prefix", ""), None)]
    try:
        mods.append(lm.get_decoder())  # OPT's forward calls model.decoder, not model
    except (AttributeError, ValueError):
        pass
    mods = [m for i, m in enumerate(mods) if m is not None and m is not lm and all(m is not o for o in mods[:i])]
    flat = hidden.reshape(1, -1, hidden.shape[-1])
    called: list[bool] = []

    def stub(*_a: Any, **_k: Any) -> Any:
        called.append(True)
        return Out(last_hidden_state=flat)

    for m in mods:
        m.forward = stub  # an instance attribute, shadowing the class's forward
    try:
        logits = lm(inputs_embeds=flat, use_cache=False).logits if mods else None
    finally:
        for m in mods:
            del m.forward
    if not called:  # the forward did not go through a decoder we know: the bare output embeddings
        logits = lm.get_output_embeddings()(flat)
    return logits.reshape(*hidden.shape[:-1], logits.shape[-1])


DROPOUT_FIELDS = ("attention_dropout", "attn_dropout", "dropout", "p")  # module attributes holding a dropout rate


def dropout_reason(lm: Any, start: int) -> str:
    """'' if nothing below decoder layer `start` (embeddings, frozen layers) drops out in training mode, else what
    does: an `nn.Dropout` with p > 0 or an attention module's dropout rate (applied functionally)."""
    upper = {id(m) for layer in list(decoder_layers(lm))[start:] for m in layer.modules()}
    for name, mod in lm.named_modules():
        if id(mod) in upper or mod is lm.get_output_embeddings():
            continue
        for field in DROPOUT_FIELDS:
            rate = getattr(mod, field, None)
            if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0:
                return f"dropout {rate:g} ({name or 'model'}.{field})"
    return ""


def sliding_window(config: Any) -> int | None:
    """The sliding-window length of any layer of the model (None if every layer attends to the whole sequence)."""
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window) if isinstance(window, int) and window > 0 else None


def shared_prefix_length(examples: list[Encoded], minimum: int = 4) -> int:
    """Number of leading tokens every example shares (at most the shortest example's length - 1), or 0 if fewer
    than `minimum`."""
    n = common_prefix_length([e.input_ids for e in examples])
    return n if n >= minimum else 0


def first_trained_layer(model: Any) -> int:
    """Index of the lowest decoder layer holding a trainable parameter or a LoRA module (0 if the embeddings train)."""
    lm = unwrap_lm(model)
    emb = lm.get_input_embeddings()
    if any(p.requires_grad for p in emb.parameters()):
        return 0
    for i, layer in enumerate(decoder_layers(model)):
        if any(p.requires_grad or "lora_" in n for n, p in layer.named_parameters()):
            return i
    return 0
