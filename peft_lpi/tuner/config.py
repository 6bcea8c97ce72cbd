"""Configuration of the LPI PEFT method."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from peft.config import PeftConfig


class LPIPeftType(str, enum.Enum):
    """The `peft_type` of LPI adapters: a str enum member, as PEFT's own `PeftType` members are.

    PEFT's `PeftType` enum has no public way to add a member (`register_peft_method` only accepts existing members;
    extending it means editing private `Enum` internals), so LPI brings its own one-member str enum. It behaves like a
    `PeftType` member wherever PEFT reads one: it equals (and hashes like) the string "LPI", so PEFT's registries keyed
    by "LPI" and the JSON adapter config work; it has `.value` (model cards, `get_peft_model(..., mixed=True)`'s error
    message); and `str()` gives "LPIPeftType.LPI", from which `get_model_status` takes "LPI". Only
    `isinstance(x, PeftType)` is False, which PEFT 0.21 never checks.
    """

    LPI = "LPI"


LPI_PEFT_TYPE = LPIPeftType.LPI
LPI_CONFIG_FORMAT_VERSION = 1

_TOWERS = ("both", "vision", "text")
_INJECTIONS = ("deep", "shallow", "additive")
_ROUTING_METRICS = ("l1", "l2", "cosine")
_TASK_LOSS_MODES = ("bce", "reference")
_INTERACTION_INITS = ("normal", "kaiming_uniform")
_REFERENCE_TASKS = ("retrieval", "grounding")


@dataclass
class LPIConfig(PeftConfig):
    """Configuration of LPI: low-rank, cross-modally correlated deep prompts, one factor set per continual task.

    For task t, with K = `prompt_depth` prompted layers, P = `prompt_length` tokens and rank r, the prompts of
    modality m are the rank-r CP tensor `prompt[l, p, d] = (1/r) * sum_k A[l, k] * B_m[p, k] * C_m[d, k]`, where the
    layer factor A is shared by both modalities (the cross-modal interaction). See `docs/method.md`.
    """

    num_tasks: int = field(default=1, metadata={"help": "Number of continual tasks; one factor set per task."})
    task_names: list[str] | None = field(
        default=None, metadata={"help": "Names of the tasks in continual order (set by the trainer; used by cards)."}
    )
    prompt_length: int = field(default=16, metadata={"help": "P: prompt tokens inserted before each prompted layer."})
    prompt_depth: int = field(
        default=9,
        metadata={
            "help": "K: number of prompted layers, i.e. rows of the layer factor A. With injection='deep' the first K "
            "encoder layers of each tower receive their prompts (VPT-deep; capped by the shallower prompted tower). "
            "With injection='shallow' only layer 0's prompts enter the towers but all K rows still enter the "
            "alignment and task losses (as in the authors' retrieval code, K = 9)."
        },
    )
    injection: Literal["deep", "shallow", "additive"] = field(
        default="deep",
        metadata={
            "help": "Where prompts enter the towers. 'deep' (VPT-deep): before each of the first K layers, inserted "
            "after token 0 and removed after the layer. 'shallow' (VPT-shallow, what the authors' retrieval code "
            "ran): once, before the first layer — visual prompts after CLS ahead of the pre-LayerNorm, without "
            "position embedding; text prompts in place of P placeholder token embeddings after BOS, with position "
            "embeddings — kept through the whole tower and removed from its output. 'additive' (what the authors' "
            "grounding code does on Swin): each of the first K layers' prompts are added to fixed token positions "
            "(the first P after token 0; the top-left window of a Swin stage's map, the prompt reshaped to that "
            "stage's width), for towers that cannot take extra tokens (Swin) and as an alternative on others."
        },
    )
    rank: int = field(default=4, metadata={"help": "r: rank of the CP decomposition of each task's prompts."})
    towers: Literal["both", "vision", "text"] = field(
        default="both", metadata={"help": "Which towers receive prompts: 'both' (LPI), 'vision' or 'text'."}
    )
    share_layer_factor: bool = field(
        default=True,
        metadata={
            "help": "Share the layer factor A between the two modalities (LPI's interaction). False is the "
            "ablation where each modality has its own layer factor."
        },
    )
    factorization: Literal["cp", "full"] = field(
        default="cp",
        metadata={
            "help": "'cp': LPI's rank-r CP factors. 'full': one free (K, P, D_m) prompt tensor per modality and task "
            "(the S-Prompts-style full-rank baseline; `rank`, `share_layer_factor` are then unused)."
        },
    )
    init_std: float = field(default=0.5, metadata={"help": "Std of the normal init of every CP factor (reference: 0.5)."})
    interaction: bool = field(
        default=True,
        metadata={
            "help": "Multi-modal correlation module: couple the visual and textual prompts of each task at every "
            "prompted layer l >= 1 through rank-r CP maps and a LayerNorm per modality."
        },
    )
    interaction_alpha: float = field(
        default=0.1, metadata={"help": "a: mixing coefficient of the correlation module (reference: 0.1)."}
    )
    interaction_init: Literal["normal", "kaiming_uniform"] = field(
        default="normal",
        metadata={
            "help": "Init of the correlation module's CP factors. 'normal': N(0, init_std^2) like the prompt factors "
            "(std 0.5). 'kaiming_uniform': U(-1/sqrt(r), 1/sqrt(r)) (std 0.29 at r = 4), the authors' grounding code."
        },
    )
    # Objective (used by `LPIObjective`; stored here so a saved adapter documents how it was trained).
    align_weight: float = field(
        default=0.1,
        metadata={
            "help": "w_align: weight of the hierarchical alignment loss (reference: 0.1). It compares the RAW CP "
            "prompts (before the correlation module, whose LayerNorm zeroes their hidden-axis mean)."
        },
    )
    align_layer_temperature: float = field(
        default=1e-4,
        metadata={
            "help": "tau of the layer-level alignment: logits = u_v . u_w / tau. 1e-4 is the authors' retrieval "
            "arithmetic (each side divided by 0.01); it gives the loss the gradient the reference has. With "
            "align_normalize=True (cosine) the grounding reference uses 0.01."
        },
    )
    align_token_temperature: float = field(
        default=1e-4, metadata={"help": "tau of the token-level alignment (same arithmetic as the layer level)."}
    )
    align_token_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the token-level alignment term inside L_align (the layer level has weight 1). 0 by "
            "default: neither of the authors' code bases has a token level (an extension of ours, unmeasured)."
        },
    )
    align_normalize: bool = field(
        default=False,
        metadata={"help": "L2-normalise the reduced prompts before alignment (False reproduces the retrieval code)."},
    )
    task_weight: float = field(default=0.1, metadata={"help": "w_task: weight of the task contrastive constraint."})
    task_temperature: float = field(default=0.001, metadata={"help": "tau_task of the task constraint."})
    task_similarity_threshold: float = field(
        default=0.4, metadata={"help": "Tasks whose semantic similarity exceeds this are positives."}
    )
    task_loss_double_sigmoid: bool = field(
        default=False,
        metadata={
            "help": "Apply the sigmoid twice in the corrected task loss (the authors' bug alone; the diagonal stays "
            "excluded). task_loss_mode='reference' reproduces their loss exactly."
        },
    )
    task_loss_mode: Literal["bce", "reference"] = field(
        default="bce",
        metadata={
            "help": "'bce': our corrected task loss (BCE-with-logits once, diagonal excluded). 'reference': the "
            "authors' nt_bxent_loss exactly (double sigmoid; each task's self-similarity +inf counted as a "
            "positive; NaN for a row without negatives) — for comparisons with their numbers, not for training."
        },
    )
    # Task identity at inference.
    num_keys: int = field(default=5, metadata={"help": "k of the k-means task keys per task and modality."})
    routing_metric: Literal["l1", "l2", "cosine"] = field(
        default="l1", metadata={"help": "Distance from a query to a task key: 'l1' (reference), 'l2' or 'cosine'."}
    )
    # Architecture overrides.
    layer_paths: dict[str, str] | None = field(
        default=None,
        metadata={
            "help": "Override of where the encoder layers live, e.g. {'vision': 'vision_model.encoder.layers', "
            "'text': 'text_model.encoder.layers'} (dotted paths from the base model)."
        },
    )
    text_causal: bool | None = field(
        default=None,
        metadata={"help": "Whether the text tower is causal (prompts after BOS visible to later tokens). None: detect."},
    )
    trainable_task: int = field(
        default=0,
        metadata={
            "help": "The task whose factors are trainable after get_peft_model (and after "
            "PeftModel.from_pretrained(..., is_trainable=True)); every other task is frozen. `train_task(t)` updates "
            "it, so a saved adapter resumes training the task it stopped at."
        },
    )
    finished_tasks: list[int] = field(
        default_factory=list,
        metadata={
            "help": "Tasks whose training is over (set by `train_task` when training moves to another task). No PEFT "
            "call makes them trainable again; only `train_task(t, allow_retrain=True)` does."
        },
    )
    format_version: int = field(
        default=LPI_CONFIG_FORMAT_VERSION, metadata={"help": "Version of the LPI adapter format (set by the library)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LPI_PEFT_TYPE
        self._validate()

    def _validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LPIConfig.{name} must be a positive integer, got {value!r}.")

        for name in ("num_tasks", "prompt_length", "prompt_depth", "rank", "num_keys"):
            positive_int(name)
        if isinstance(self.trainable_task, bool) or not isinstance(self.trainable_task, int):
            raise ValueError(f"LPIConfig.trainable_task must be a task id (int), got {self.trainable_task!r}.")
        if not 0 <= self.trainable_task < self.num_tasks:
            raise ValueError(
                f"LPIConfig.trainable_task={self.trainable_task} is not a task of this adapter (0..{self.num_tasks - 1})."
            )
        self.finished_tasks = sorted({int(t) for t in self.finished_tasks or []})
        if any(not 0 <= t < self.num_tasks for t in self.finished_tasks):
            raise ValueError(f"LPIConfig.finished_tasks={self.finished_tasks} has ids outside 0..{self.num_tasks - 1}.")
        if self.trainable_task in self.finished_tasks:
            raise ValueError(
                f"LPIConfig.trainable_task={self.trainable_task} is listed in finished_tasks: a finished task is not "
                "trainable. Pick an unfinished task, or retrain it explicitly with `train_task(t, allow_retrain=True)`."
            )
        if self.task_names is not None and len(self.task_names) > self.num_tasks:
            raise ValueError(f"LPIConfig.task_names has {len(self.task_names)} names for {self.num_tasks} tasks.")
        if self.towers not in _TOWERS:
            raise ValueError(f"LPIConfig.towers must be one of {_TOWERS}, got {self.towers!r}.")
        if self.injection not in _INJECTIONS:
            raise ValueError(f"LPIConfig.injection must be one of {_INJECTIONS}, got {self.injection!r}.")
        if self.factorization not in ("cp", "full"):
            raise ValueError(f"LPIConfig.factorization must be 'cp' or 'full', got {self.factorization!r}.")
        if self.task_loss_mode not in _TASK_LOSS_MODES:
            raise ValueError(f"LPIConfig.task_loss_mode must be one of {_TASK_LOSS_MODES}, got {self.task_loss_mode!r}.")
        if self.interaction_init not in _INTERACTION_INITS:
            raise ValueError(
                f"LPIConfig.interaction_init must be one of {_INTERACTION_INITS}, got {self.interaction_init!r}."
            )
        if self.align_token_weight < 0:
            raise ValueError(f"LPIConfig.align_token_weight must be >= 0, got {self.align_token_weight}.")
        if self.routing_metric not in _ROUTING_METRICS:
            raise ValueError(f"LPIConfig.routing_metric must be one of {_ROUTING_METRICS}, got {self.routing_metric!r}.")
        if not self.init_std > 0:
            raise ValueError(f"LPIConfig.init_std must be > 0, got {self.init_std}.")
        if not 0.0 <= self.interaction_alpha <= 1.0:
            raise ValueError(f"LPIConfig.interaction_alpha must lie in [0, 1], got {self.interaction_alpha}.")
        for name in ("align_layer_temperature", "align_token_temperature", "task_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LPIConfig.{name} must be > 0, got {getattr(self, name)}.")
        if self.layer_paths is not None:
            unknown = set(self.layer_paths) - {"vision", "text"}
            if unknown:
                raise ValueError(f"LPIConfig.layer_paths keys must be 'vision' and/or 'text', got {sorted(unknown)}.")
        if self.format_version > LPI_CONFIG_FORMAT_VERSION:
            raise ValueError(
                f"This adapter was written by a newer peft_lpi (format version {self.format_version}; this install "
                f"reads up to {LPI_CONFIG_FORMAT_VERSION}). Upgrade with `pip install -U peft_lpi`."
            )

    @classmethod
    def reference(cls, task: str = "retrieval", **overrides: Any) -> LPIConfig:
        """A config whose every setting reproduces the authors' code for `task` ("retrieval" or "grounding").

        For comparisons with the paper's tables; our recommended defaults differ where the reference has a defect
        (see the table in docs/method.md). `overrides` replace any field (e.g. `num_tasks=12`).

        retrieval (CLIP, S-Prompts code base): K = 9 rows of A, P = 16, r = 4, factors N(0, 0.5^2); shallow
        injection (only layer 0's prompts enter, and stay through the towers); no correlation module; alignment on
        the raw prompts, un-normalised, each side / 0.01 (tau = 1e-4), weight 0.1, no token level; task loss
        exactly as theirs (tau 0.001, threshold 0.4, weight 0.1); k = 5 L1 keys.
        grounding (GLIP): K = 9, P = 16, r = 4; correlation module (a = 0.1, kaiming-uniform init); alignment
        L2-normalised over P, cosine x 100 (tau = 0.01), weight 0.1; task loss as theirs with tau 0.01; k = 5 L1
        keys; the Swin tower takes prompts additively (injection "additive" where this build has it).
        """
        if task not in _REFERENCE_TASKS:
            raise ValueError(f"LPIConfig.reference(task) needs task in {_REFERENCE_TASKS}, got {task!r}.")
        settings: dict[str, Any] = dict(
            prompt_length=16,
            prompt_depth=9,
            rank=4,
            towers="both",
            share_layer_factor=True,
            factorization="cp",
            init_std=0.5,
            align_weight=0.1,
            align_token_weight=0.0,
            task_weight=0.1,
            task_similarity_threshold=0.4,
            task_loss_mode="reference",
            task_loss_double_sigmoid=True,
            num_keys=5,
            routing_metric="l1",
        )
        if task == "retrieval":
            settings.update(
                injection="shallow",
                interaction=False,
                align_layer_temperature=1e-4,
                align_token_temperature=1e-4,
                align_normalize=False,
                task_temperature=0.001,
            )
        else:
            settings.update(
                injection="additive",  # the authors add prompts to Swin's top-left window and BERT's first tokens
                interaction=True,
                interaction_alpha=0.1,
                interaction_init="kaiming_uniform",
                align_layer_temperature=0.01,
                align_token_temperature=0.01,
                align_normalize=True,
                task_temperature=0.01,
            )
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"LPIConfig.reference got unknown fields {sorted(unknown)}.")
        settings.update(overrides)
        return cls(**settings)

    @property
    def prompted_modalities(self) -> tuple[str, ...]:
        """The modalities that receive prompts, in a fixed order."""
        return ("vision", "text") if self.towers == "both" else (self.towers,)
