"""The prompt factors of LPI: per-task CP factors, the multi-modal correlation module, and prompt generation.

For task t, K prompted layers, P tokens, rank r and hidden sizes D_v, D_w (docs/method.md):

    A_t    (K, r)      layer factor, shared by both modalities (the cross-modal interaction)
    B_t^m  (P, r)      token factor of modality m
    C_t^m  (D_m, r)    hidden factor of modality m
    prompt_t^m[l, p, d] = (1/r) * sum_k A_t[l, k] * B_t^m[p, k] * C_t^m[d, k]

The correlation module couples the two modalities' prompts of one task at every layer l >= 1 with rank-r CP maps
W_v2t (D_v+1 -> D_w) and W_t2v (D_w+1 -> D_v) and a LayerNorm per modality.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

VISION, TEXT = "vision", "text"


class CorrelationModule(nn.Module):
    """Multi-modal correlation of one task's prompts (layers 1..K-1).

    W_v2t(l) = (1/r) sum_k L[l,k] In[:,k] Out[:,k]^T is never materialised: `[p_v, 1] @ W_v2t(l)` is computed as
    `(([p_v, 1] @ In) * L[l]) @ Out^T / r`, which costs O(P (D_v + D_w) r) per layer.

    The LayerNorms' affine weight starts at the expected std of the CP prompts (init_std**3 / sqrt(r)), so the module
    keeps the prompt scale at initialisation instead of inflating prompts of ~0.06 to unit variance.

    `init`: how the six CP factors of the maps start. "normal": N(0, init_std^2) like the prompt factors (ours;
    std 0.5). "kaiming_uniform": `nn.init.kaiming_uniform_(a=sqrt(5))`, i.e. U(-1/sqrt(r), 1/sqrt(r)) (std 0.29 at
    r = 4), as the authors' grounding code (the default init of its parameters).
    """

    def __init__(
        self,
        depth: int,
        vision_size: int,
        text_size: int,
        rank: int,
        init_std: float,
        alpha: float,
        init: str = "normal",
    ):
        super().__init__()
        if init not in ("normal", "kaiming_uniform"):
            raise ValueError(f"Correlation init must be 'normal' or 'kaiming_uniform', got {init!r}.")
        self.rank, self.alpha = rank, alpha
        layers = depth - 1

        def factor(rows: int) -> nn.Parameter:
            if init == "normal":
                return nn.Parameter(torch.randn(rows, rank) * init_std)
            weight = torch.empty(rows, rank)
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            return nn.Parameter(weight)

        self.v2t_layer = factor(layers)
        self.v2t_in = factor(vision_size + 1)
        self.v2t_out = factor(text_size)
        self.t2v_layer = factor(layers)
        self.t2v_in = factor(text_size + 1)
        self.t2v_out = factor(vision_size)
        prompt_std = init_std**3 / math.sqrt(rank)
        self.vision_norm = nn.LayerNorm(vision_size)
        self.text_norm = nn.LayerNorm(text_size)
        for norm in (self.vision_norm, self.text_norm):
            nn.init.constant_(norm.weight, prompt_std)

    @staticmethod
    def _project(source: torch.Tensor, layer: torch.Tensor, inp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # source: (L, P, D_in) -> (L, P, D_out); layer: (L, r), inp: (D_in + 1, r), out: (D_out, r)
        ones = source.new_ones(*source.shape[:-1], 1)
        coeffs = torch.cat([source, ones], dim=-1) @ inp  # (L, P, r)
        return (coeffs * layer[:, None, :]) @ out.T / inp.shape[-1]

    def forward(self, vision: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vision (K, P, D_v), text (K, P, D_w) -> coupled prompts of the same shapes; layer 0 is unchanged.

        Both updates read the prompts as they were before either update.
        """
        if vision.shape[0] < 2:
            return vision, text
        v, w = vision[1:], text[1:]
        a = self.alpha
        new_w = self.text_norm((1 - a) * w + a * self._project(v, self.v2t_layer, self.v2t_in, self.v2t_out))
        new_v = self.vision_norm((1 - a) * v + a * self._project(w, self.t2v_layer, self.t2v_in, self.t2v_out))
        return torch.cat([vision[:1], new_v], dim=0), torch.cat([text[:1], new_w], dim=0)


class LPITaskFactors(nn.Module):
    """The trainable factors of one task. Each task owns separate Parameters so earlier tasks freeze exactly."""

    def __init__(
        self,
        depth: int,
        prompt_length: int,
        rank: int,
        hidden_sizes: dict[str, int],
        share_layer_factor: bool,
        init_std: float,
        interaction: bool,
        alpha: float,
        factorization: str = "cp",
        interaction_init: str = "normal",
    ):
        super().__init__()
        self.rank = rank
        self.modalities = tuple(m for m in (VISION, TEXT) if m in hidden_sizes)
        self.factorization = factorization

        def normal(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape) * init_std)

        self.share_layer_factor = share_layer_factor or len(self.modalities) == 1
        if factorization == "full":  # S-Prompts-style baseline: free prompts, no factorisation
            self.full_prompts = nn.ParameterDict(
                {m: normal(depth, prompt_length, hidden_sizes[m]) for m in self.modalities}
            )
        elif self.share_layer_factor:
            self.layer_factor = normal(depth, rank)  # A: (K, r), common to both modalities
        else:
            self.layer_factors = nn.ParameterDict({m: normal(depth, rank) for m in self.modalities})
        if factorization == "cp":
            self.token_factors = nn.ParameterDict({m: normal(prompt_length, rank) for m in self.modalities})
            self.hidden_factors = nn.ParameterDict({m: normal(hidden_sizes[m], rank) for m in self.modalities})
        self.correlation = None
        if interaction and len(self.modalities) == 2 and depth > 1:
            self.correlation = CorrelationModule(
                depth, hidden_sizes[VISION], hidden_sizes[TEXT], rank, init_std, alpha, interaction_init
            )

    def layer_factor_of(self, modality: str) -> torch.Tensor:
        return self.layer_factor if self.share_layer_factor else self.layer_factors[modality]

    def raw_prompts(self, modality: str) -> torch.Tensor:
        """The CP prompts of one modality before the correlation module: (K, P, D_m)."""
        if self.factorization == "full":
            return self.full_prompts[modality]
        a = self.layer_factor_of(modality)
        b = self.token_factors[modality]
        c = self.hidden_factors[modality]
        return torch.einsum("lk,pk,dk->lpd", a, b, c) / self.rank

    def forward(self) -> dict[str, torch.Tensor]:
        """Prompts of every prompted modality, after the correlation module: {modality: (K, P, D_m)}."""
        prompts = {m: self.raw_prompts(m) for m in self.modalities}
        if self.correlation is not None:
            prompts[VISION], prompts[TEXT] = self.correlation(prompts[VISION], prompts[TEXT])
        return prompts


class LPIPromptBank(nn.Module):
    """All tasks' factors of one adapter plus their routing keys (buffers, saved with the adapter)."""

    def __init__(
        self,
        num_tasks: int,
        depth: int,
        prompt_length: int,
        rank: int,
        hidden_sizes: dict[str, int],
        key_sizes: dict[str, int],
        num_keys: int,
        share_layer_factor: bool = True,
        init_std: float = 0.5,
        interaction: bool = True,
        alpha: float = 0.1,
        factorization: str = "cp",
        interaction_init: str = "normal",
    ):
        super().__init__()
        self.depth, self.prompt_length, self.rank = depth, prompt_length, rank
        self.hidden_sizes = dict(hidden_sizes)
        self._factor_kwargs = dict(
            depth=depth,
            prompt_length=prompt_length,
            rank=rank,
            hidden_sizes=self.hidden_sizes,
            share_layer_factor=share_layer_factor,
            init_std=init_std,
            interaction=interaction,
            alpha=alpha,
            factorization=factorization,
            interaction_init=interaction_init,
        )
        self.tasks = nn.ModuleList([LPITaskFactors(**self._factor_kwargs) for _ in range(num_tasks)])
        self._eval_cache: dict[int, tuple[tuple, dict[str, torch.Tensor]]] = {}
        self._step_cache: dict[int, tuple[tuple, dict[str, torch.Tensor]]] | None = None  # inside reuse_prompts()
        # Task keys: (T, k, D_embed) per modality, zero until the task's keys are built; `has_keys` says which tasks
        # have keys (no NaN sentinels: every buffer stays finite, so saved / reloaded adapters compare with allclose).
        for modality, size in key_sizes.items():
            self.register_buffer(f"{modality}_keys", torch.zeros(num_tasks, num_keys, size))
        self.register_buffer("has_keys", torch.zeros(num_tasks, dtype=torch.bool))
        self._partial_keys: dict[int, set[str]] = {}  # modalities given so far to a task without keys (not saved)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in (VISION, TEXT) if m in self.hidden_sizes)

    def add_task(self) -> int:
        """Append a freshly initialised task (factors on the device of the existing ones); returns its index."""
        reference = next(self.parameters())
        self.tasks.append(LPITaskFactors(**self._factor_kwargs).to(device=reference.device, dtype=reference.dtype))
        for name, buffer in list(self.named_buffers(recurse=False)):
            pad = torch.zeros((1, *buffer.shape[1:]), dtype=buffer.dtype, device=buffer.device)
            setattr(self, name, torch.cat([buffer, pad], dim=0))
        return self.num_tasks - 1

    def task_prompts(self, task_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Prompts of the given tasks, each task computed once: {modality: (len(task_ids), K, P, D_m)} in fp32."""
        per_task = [self._prompts_of(int(t)) for t in task_ids.tolist()]
        return {m: torch.stack([p[m] for p in per_task]) for m in self.modalities}

    def _prompts_of(self, task: int) -> dict[str, torch.Tensor]:
        """One task's prompts, computed as rarely as is exact.

        - A task none of whose parameters requires grad (no_grad / inference, or a frozen earlier task during
          training) gets detached prompts cached until any of its parameters changes.
        - A task being trained gets prompts with their autograd graph; inside `reuse_prompts()` they are computed
          once and shared by every caller (both towers, the losses), otherwise recomputed at each call.

        The cache key is the parameters' version counters (bumped by every in-place update: optimiser steps,
        `load_state_dict`, `load_task`) and the autocast state, so a cached prompt can never be stale.
        """
        factors = self.tasks[task]
        params = list(factors.parameters())
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if trainable and self._step_cache is None:
            return factors()
        device_type = params[0].device.type if params else "cpu"
        key = (tuple((p.data_ptr(), p._version) for p in params), torch.is_autocast_enabled(device_type))
        cache = self._step_cache if trainable else self._eval_cache
        cached = cache.get(task)
        if cached is not None and cached[0] == key:
            return cached[1]
        if trainable:
            prompts = factors()
        else:
            with torch.no_grad():
                prompts = factors()
        cache[task] = (key, prompts)
        return prompts

    @contextlib.contextmanager
    def reuse_prompts(self) -> Iterator[None]:
        """Inside this block a trained task's prompts (with their graph) are computed once and reused; re-entrant."""
        if self._step_cache is not None:
            yield
            return
        self._step_cache = {}
        try:
            yield
        finally:
            self._step_cache = None

    def task_raw_prompts(self, task_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """RAW CP prompts (before the correlation module) of the given tasks: {modality: (len(task_ids), K, P, D_m)}.

        What the alignment loss compares (docs/method.md): after the correlation module's LayerNorm the hidden-axis
        mean of every prompt row is exactly 0.
        """
        ids = [int(t) for t in torch.as_tensor(task_ids).reshape(-1).tolist()]
        return {m: torch.stack([self.tasks[t].raw_prompts(m) for t in ids]) for m in self.modalities}

    def prompts_for_samples(self, modality: str, sample_tasks: torch.Tensor) -> torch.Tensor:
        """Per-sample prompts (B, K, P, D_m): each distinct task computed once, then gathered per sample."""
        unique, inverse = torch.unique(sample_tasks, return_inverse=True)
        prompts = self.task_prompts(unique.cpu())[modality]  # (U, K, P, D)
        return prompts.index_select(0, inverse.to(prompts.device))

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.tasks[0].parameters()) if self.num_tasks else 0
