"""The LPI tuner layer: wraps one encoder layer, inserts the prompts after token 0, runs it, strips them.

The sequence outside each layer never changes length, so every pooling rule (CLIP's EOS index, SigLIP's last token,
CLS, attention-pool heads) and every mask built once at the top of the encoder stays valid. Only the layer's own
attention mask is widened for the P prompt positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

try:  # transformers' output capturing (output_hidden_states) records each layer's output through a forward hook
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older / newer transformers without this mechanism
    _active_collector = None

PromptSource = Callable[[str, int, int], "torch.Tensor | None"]

# Encoder layers whose forward is exactly `x + attn(ln1(x)); x + mlp(ln2(x))` with CLIP-style q/k/v/out projections
# (transformers 5 signatures `forward(hidden_states, attention_mask, **kwargs)`): `prefix_attention_layer` runs them
# with the prompts as extra keys/values only (see there).
PREFIX_ATTENTION_LAYERS = frozenset({"CLIPEncoderLayer", "SiglipEncoderLayer"})

MERGE_ERROR = (
    "LPI prompts are extra tokens, not weight deltas: they cannot be merged into the base weights. Keep the "
    "PeftModel for inference, or use `unload()` to get the base model back without prompts."
)


def prefix_attention_layer(
    layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, prompts: torch.Tensor, causal: bool
) -> torch.Tensor:
    """One pre-LN encoder layer with the prompts inserted after token 0, computing only what survives the strip.

    The wrapped layer's output at the prompt positions is discarded (VPT-deep), so the prompts only matter as keys
    and values of the real tokens' attention: their query, attention output, out_proj and MLP rows are never
    needed. This runs LayerNorm1 and the k/v projections on the P prompt rows and everything else on the L real
    rows only; the result equals "insert, run the layer, strip" up to float rounding. The key order (prompts last
    instead of after token 0) does not matter to attention; the mask says who sees them: every real token, except
    token 0 when causal.
    """
    attn = layer.self_attn
    batch, length, width = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    normed = layer.layer_norm1(hidden)
    # per sample even when the whole batch shares one task: projecting (1, P, D) once would round differently from a
    # per-sample batch of the same task, and a sample's output must not depend on how its task was selected
    prompt_normed = layer.layer_norm1(prompts)

    def keys_values(proj: nn.Module) -> torch.Tensor:
        both = torch.cat([proj(normed), proj(prompt_normed)], dim=1)  # (B, L + P, D)
        return both.view(batch, -1, heads, head_dim).transpose(1, 2)

    query = attn.q_proj(normed).view(batch, length, heads, head_dim).transpose(1, 2)
    key, value = keys_values(attn.k_proj), keys_values(attn.v_proj)
    num_prompts = prompts.shape[1]
    attn_mask = None
    if mask is not None or causal:
        if mask is None:
            visible = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()[None, None]
        else:
            visible = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        prompt_columns = visible.new_ones(*visible.shape[:-1], num_prompts)
        if causal:  # token 0 (BOS) precedes the prompts and cannot see them
            prompt_columns[..., 0, :] = False
        attn_mask = torch.cat([visible, prompt_columns], dim=-1)  # (B or 1, 1, L, L + P)
    dropout = attn.dropout if attn.training else 0.0
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout, scale=attn.scale)
    hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(batch, length, width))
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def widen_attention_mask(mask: torch.Tensor | None, num_prompts: int, seq_len: int, causal: bool) -> torch.Tensor | None:
    """Widen a layer's attention mask from L to L + P positions, prompts at positions 1..P.

    Supported forms: None (no padding, non-causal), a 2D padding mask (B, L) as flash attention uses, and a 4D
    mask (B or 1, 1, L, L), boolean (True = attend) or additive float (0 = attend). Prompt columns are visible to
    every real token (to every token after token 0 when causal); prompt rows attend everywhere (their outputs are
    discarded, but a fully masked row would give NaN under eager attention).
    """
    if mask is None:
        if not causal:
            return None
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()[None, None]
    if mask.dim() == 2:  # (B, L) padding mask: prompts are never padding
        ones = mask.new_ones(mask.shape[0], num_prompts)
        return torch.cat([mask[:, :1], ones, mask[:, 1:]], dim=1)
    if mask.dim() != 4:
        raise ValueError(
            f"LPI cannot widen an attention mask of shape {tuple(mask.shape)} for prompts; supported are None, 2D "
            "padding masks and 4D masks (eager / sdpa attention). Load the model with attn_implementation='sdpa' "
            "or 'eager'."
        )
    is_bool = mask.dtype == torch.bool
    visible = mask if is_bool else mask > torch.finfo(mask.dtype).min / 2  # (B, 1, L, L)
    batch, heads, rows, cols = visible.shape
    widened = visible.new_ones(batch, heads, rows + num_prompts, cols + num_prompts)
    real = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1 + num_prompts, cols + num_prompts)])
    real = real.to(mask.device)
    widened[:, :, real[:, None], real[None, :]] = visible
    if causal:  # token 0 (BOS) precedes the prompts and cannot see them
        widened[:, :, 0, 1 : 1 + num_prompts] = False
    if is_bool:
        return widened
    zero = torch.zeros((), dtype=mask.dtype, device=mask.device)
    return torch.where(widened, zero, torch.finfo(mask.dtype).min)


class LPIPromptedLayer(nn.Module, BaseTunerLayer):
    """A tuner layer around one encoder layer of one tower (VPT-deep).

    It owns no parameters: the factors of every task live on the tuner (`LPIModel.lpi_prompts`), shared across
    layers and modalities, and this layer asks `prompt_source(modality, layer_index, batch)` for its (B, P, D)
    prompts, or None when prompts are off (adapter disabled, no active adapter).
    """

    # PEFT's status helpers (get_layer_status / get_model_status) read `adapter_layer_names` containers keyed by adapter
    # name. The factors live on the tuner, so the layer exposes a view, not registered as a submodule (so nothing is
    # saved twice): {adapter: the factors of the task that adapter trains}. Trainability itself is the tuner's state:
    # the layer's set_adapter / enable_adapters / set_requires_grad never touch requires_grad directly.
    adapter_layer_names: tuple[str, ...] = ("lpi_training_factors",)
    other_param_names: tuple[str, ...] = ()
    training_factors_source: Callable[[], nn.ModuleDict] | None = None  # set by LPIModel when it wraps the layer
    requires_grad_sink: Callable[[list[str], bool], None] | None = None  # LPIModel.set_requires_grad

    def __init__(
        self, base_layer: nn.Module, modality: str, layer_index: int, causal: bool, prompt_source: PromptSource
    ):
        super().__init__()
        self.base_layer = base_layer
        self.modality = modality
        self.layer_index = layer_index
        self.causal = causal
        self.prompt_source = prompt_source
        self._disable_adapters = False
        self.merged_adapters = []
        signature = inspect.signature(base_layer.forward)
        self._parameter_names = [
            name
            for name, p in signature.parameters.items()
            if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_ERROR)

    def unmerge(self) -> None:
        return None

    @property
    def lpi_training_factors(self) -> nn.ModuleDict:
        """{adapter name: factors of its training task} (a view of the tuner's factors, for PEFT's status helpers)."""
        return self.training_factors_source() if self.training_factors_source is not None else nn.ModuleDict()

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        """Record the active adapter; requires_grad is the tuner's (`LPIModel.set_adapter`)."""
        self._active_adapter = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)

    def enable_adapters(self, enabled: bool) -> None:
        """Switch the prompts of this layer on or off; requires_grad is the tuner's (`LPIModel._enable_adapter_layers`)."""
        self._disable_adapters = not enabled

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """Delegate to `LPIModel.set_requires_grad`: it never makes a finished task trainable."""
        if self.requires_grad_sink is not None:
            self.requires_grad_sink([adapter_names] if isinstance(adapter_names, str) else list(adapter_names), requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """The factors live on the tuner (`LPIModel.delete_adapter` removes them); only the active list changes here."""
        self._active_adapter = [name for name in self.active_adapters if name != adapter_name]

    def _split_arguments(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any, Callable[..., tuple, dict]]:
        """Find hidden_states (parameter 0) and attention_mask by signature, whatever their position."""
        args, kwargs = list(args), dict(kwargs)  # never mutate the caller's kwargs (forward reuses them unprompted)
        hidden = args[0] if args else kwargs.pop(self._parameter_names[0])
        if args:
            args = args[1:]
        mask_position = (
            self._parameter_names.index("attention_mask") - 1 if "attention_mask" in self._parameter_names else None
        )
        if mask_position is not None and mask_position < len(args):
            mask = args[mask_position]
        else:
            mask = kwargs.get("attention_mask")

        def rebuild(new_hidden: torch.Tensor, new_mask: Any) -> tuple[tuple, dict]:
            new_args, new_kwargs = list(args), dict(kwargs)
            if mask_position is not None and mask_position < len(new_args):
                new_args[mask_position] = new_mask
            elif "attention_mask" in new_kwargs or mask_position is not None:
                new_kwargs["attention_mask"] = new_mask
            return (new_hidden, *new_args), new_kwargs

        return hidden, mask, rebuild

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, mask, rebuild = self._split_arguments(args, kwargs)
        prompts = None if self.disable_adapters else self.prompt_source(self.modality, self.layer_index, hidden.shape[0])
        if prompts is None:
            return self.base_layer(*args, **kwargs)
        batch, seq_len, width = hidden.shape
        if prompts.shape[-1] != width:
            raise ValueError(
                f"LPI {self.modality} prompts have width {prompts.shape[-1]} but layer {self.layer_index} of the "
                f"{self.modality} tower receives hidden states of width {width}: the tower's config hidden_size does "
                "not match its layers. Fix the model config or LPIConfig.layer_paths."
            )
        num_prompts = prompts.shape[1]
        prompts = prompts.to(dtype=hidden.dtype)
        if self._can_run_prefix_attention(args, kwargs, mask):
            causal = self.causal or kwargs.get("is_causal") is True
            return prefix_attention_layer(self.base_layer, hidden, mask, prompts, causal)
        prompted = torch.cat([hidden[:, :1], prompts, hidden[:, 1:]], dim=1)  # (B, L + P, D)
        causal = self.causal or kwargs.get("is_causal") is True
        new_mask = widen_attention_mask(mask, num_prompts, seq_len, causal)
        if new_mask is not None and new_mask.device != hidden.device:
            new_mask = new_mask.to(hidden.device)
        new_args, new_kwargs = rebuild(prompted, new_mask)
        if causal and "is_causal" in new_kwargs:
            new_kwargs["is_causal"] = False  # the explicit widened mask now carries causality

        collector, token = self._suspend_hidden_state_capture()
        try:
            output = self.base_layer(*new_args, **new_kwargs)
        finally:
            if token is not None:
                _active_collector.reset(token)
        stripped = self._strip(output, num_prompts)
        if collector is not None:
            self._record_hidden_states(collector, hidden, stripped)
        return stripped

    def _can_run_prefix_attention(self, args: tuple, kwargs: dict, mask: Any) -> bool:
        """Whether this call may take `prefix_attention_layer` (same result, less work) instead of insert/run/strip:
        a known pre-LN layer with sdpa attention, plain nn.Linear projections, no hooks or output capturing (they
        would see the layer differently), no gradient checkpointing (it wraps the base layer's own call), and
        nothing but hidden states, a None / 4-D mask and is_causal as arguments."""
        layer = self.base_layer
        if type(layer).__name__ not in PREFIX_ATTENTION_LAYERS or self._parameter_names[:2] != [
            "hidden_states", "attention_mask"
        ]:
            return False
        attn = getattr(layer, "self_attn", None)
        if attn is None or getattr(getattr(attn, "config", None), "_attn_implementation", None) != "sdpa":
            return False
        if not all(type(getattr(attn, n, None)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj", "out_proj")):
            return False
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            return False
        if layer._forward_hooks or layer._forward_pre_hooks or attn._forward_hooks or attn._forward_pre_hooks:
            return False
        if _active_collector is not None and _active_collector.get():  # {} when nothing is captured
            return False
        if len(args) > 2 or set(kwargs) - {"hidden_states", "attention_mask", "is_causal"}:
            return False
        return mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4)

    @staticmethod
    def _strip(output: Any, num_prompts: int) -> Any:
        def strip(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor[:, :1], tensor[:, 1 + num_prompts :]], dim=1)

        if isinstance(output, torch.Tensor):
            return strip(output)
        if isinstance(output, tuple):
            return (strip(output[0]), *output[1:])
        raise TypeError(f"Unexpected encoder layer output of type {type(output).__name__}.")

    @staticmethod
    def _suspend_hidden_state_capture() -> tuple[dict | None, Any]:
        """Hide "hidden_states" from transformers' capture hooks while the prompted (L + P) layer runs.

        Other captured outputs (attentions) are still recorded, with the prompt positions included.
        """
        if _active_collector is None:
            return None, None
        collected = _active_collector.get()
        if collected is None or "hidden_states" not in collected:
            return None, None
        without_hidden = {k: v for k, v in collected.items() if k != "hidden_states"}
        return collected, _active_collector.set(without_hidden)

    @staticmethod
    def _record_hidden_states(collected: dict, layer_input: torch.Tensor, output: Any) -> None:
        """Record the prompt-free states the way transformers' own capture hook would."""
        states = collected["hidden_states"]
        selection = collected.get("_hidden_states_layers")

        def append(state: torch.Tensor) -> None:
            states.append(state if selection is None or len(states) in selection else None)

        if len(states) == 0:
            append(layer_input)
        append(output if isinstance(output, torch.Tensor) else output[0])
