"""How to train, and what one run is: `TrainConfig` and `RunConfig` (a ModelConfig with its
TrainConfig). Dotted overrides such as {"train.lr": 1e-3, "model.pos": "rope"} are applied here and
nowhere else, with `dataclasses.replace`, so every change is validated like a fresh config.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from typing import Any, Literal

from .model.config import ModelConfig, get_preset
from .validation import ConfigBase, ConfigError, require


@dataclass
class TrainConfig(ConfigBase):
    """How to train. Stops at the first of max_steps / max_tokens / time_budget_s / early stopping.

    dtype 'auto' = bf16 on GPUs that have it (else fp16 with a gradient scaler), fp32 elsewhere.
    compile None = on for CUDA; compile_mode is torch.compile's mode: 'reduce-overhead' replays the
    step's kernels as CUDA graphs, which is what small models need, whose steps are launch-bound;
    compile_blocks compiles each Block instead of the whole model, so identical layers share one compiled
    graph (shorter cold start-up, a few more launches a step). ema = tau (e.g. 0.999) evaluates and keeps averaged
    weights too; the
    best checkpoint then holds the EMA weights and is chosen on val_loss_ema. checkpoint_interval
    None = every eval_interval. The LR decays over max_steps (or the steps max_tokens allows), else
    over the time budget. train_loss is the optimised loss (label smoothing, MoE auxiliary term);
    val_loss is plain cross-entropy on a fixed evaluation set: eval_tokens target tokens of the val
    split in windows drawn once (the same for every batch size: what studies use, so every arm is
    scored on the same tokens), or, with eval_tokens None, eval_batches batches of eval_batch_size
    (None: batch_size), which depends on the batch size.
    """

    device: str = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool | None = None
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_blocks: bool = (
        False  # compile one Block and reuse it for every layer (start-up: one layer's compile, not n_layer's)
    )
    seed: int = 1337
    deterministic: bool = False
    # optimisation
    optimizer: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_frac: float = 0.2
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    layer_lr_decay: float = 1.0
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    ema: float | None = None
    # batches
    batch_size: int = 32
    grad_accum_steps: int = 1
    batch_mode: Literal["stream", "document"] = "stream"
    # CUDA: keep the train split on the GPU when it fits a share of free memory (training.DATA_ON_DEVICE_SHARE)
    data_on_device: bool = True
    # stopping
    max_steps: int | None = 1000
    max_tokens: int | None = None
    time_budget_s: float | None = None
    early_stopping_patience: int | None = None
    # evaluation, logging, checkpoints
    eval_interval: int = 100
    eval_batches: int = 20
    eval_batch_size: int | None = None
    eval_tokens: int | None = None
    eval_split: Literal["val", "selection"] = "val"  # 'selection': the first half of val (studies choose on it)
    log_interval: int = 10
    checkpoint_interval: int | None = None
    eval_full: bool = (
        False  # score every token of eval_split at each evaluation (tiled windows) instead of the fixed sample
    )
    checkpoints: bool = (
        True  # False: no checkpoint is written (benchmarks, where a save would be timed); a cut run then starts over
    )
    grad_spike_factor: float = 10.0  # a gradient norm this many times the recent median is logged as a spike
    # Fine-tuning: start from these weights instead of a random init (a transformers GPT-2/Llama folder or hub name, or
    # a
    # folder labutils' save_model wrote); the model config must be the checkpoint's:
    # labutils.pretrained_config(init_from)
    init_from: str | None = None
    freeze: tuple[str, ...] | None = (
        None  # parameter-name globs that stay frozen (model.utils.freeze), e.g. ("tok_emb.*",)
    )

    def validate(self) -> None:
        require(
            re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None,
            "device",
            f"unknown device {self.device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",
        )
        require(self.lr > 0, "lr", f"must be positive, got {self.lr}; AdamW on small LMs uses 1e-4 to 3e-3")
        require(
            0.0 <= self.min_lr_ratio <= 1.0,
            "min_lr_ratio",
            f"must be in [0, 1] (the LR floor as a fraction of lr), got {self.min_lr_ratio}",
        )
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(
            0.0 < self.decay_frac <= 1.0,
            "decay_frac",
            f"must be in (0, 1] (share of the run spent decaying with 'wsd'), got {self.decay_frac}",
        )
        require(all(0.0 <= b < 1.0 for b in self.betas), "betas", f"each beta must be in [0, 1), got {self.betas}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(
            0.0 < self.layer_lr_decay <= 1.0,
            "layer_lr_decay",
            f"must be in (0, 1] (1 = off), got {self.layer_lr_decay}",
        )
        require(self.muon_lr > 0, "muon_lr", f"must be positive, got {self.muon_lr}; Muon typically uses 0.01 to 0.05")
        require(0.0 <= self.muon_momentum < 1.0, "muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        require(self.grad_clip >= 0, "grad_clip", f"must be >= 0 (0 = no clipping), got {self.grad_clip}")
        require(0.0 <= self.label_smoothing < 1.0, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        require(
            self.ema is None or 0.0 < self.ema < 1.0,
            "ema",
            f"must be None (off) or a decay tau in (0, 1) such as 0.999, got {self.ema}",
        )
        require(self.batch_size >= 1, "batch_size", f"must be a positive integer, got {self.batch_size}")
        require(self.grad_accum_steps >= 1, "grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        for name in (
            "max_steps",
            "max_tokens",
            "early_stopping_patience",
            "eval_batch_size",
            "eval_tokens",
            "checkpoint_interval",
        ):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be a positive integer or None, got {value}")
        require(
            self.time_budget_s is None or self.time_budget_s > 0,
            "time_budget_s",
            f"must be positive seconds or None, got {self.time_budget_s}",
        )
        require(
            any(v is not None for v in (self.max_steps, self.max_tokens, self.time_budget_s)),
            "max_steps",
            "the run would never stop: set max_steps, max_tokens or time_budget_s",
        )
        if self.max_steps is not None:
            require(
                self.warmup_steps < self.max_steps,
                "warmup_steps",
                f"warm-up ({self.warmup_steps} steps) must end before max_steps={self.max_steps}; lower warmup_steps",
            )
        for name in ("eval_interval", "eval_batches", "log_interval"):
            require(getattr(self, name) >= 1, name, f"must be a positive integer, got {getattr(self, name)}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        require(
            self.grad_spike_factor > 1,
            "grad_spike_factor",
            f"must be > 1 (times the median gradient norm), got {self.grad_spike_factor}",
        )
        require(
            self.init_from is None or (isinstance(self.init_from, str) and self.init_from.strip() != ""),
            "init_from",
            f"must be None or a checkpoint folder / hub name, got {self.init_from!r}",
        )
        require(self.freeze is None or len(self.freeze) > 0, "freeze", "give at least one parameter-name glob, or None")


def model_config(model_cfg: ModelConfig | dict | str, vocab_size: int | None = None) -> ModelConfig:
    """A ModelConfig from a config, a dict ({"preset": name, **overrides} or fields) or a preset name.

    A missing vocab_size is taken from the data; a model vocabulary smaller than the data's is refused.
    """
    if isinstance(model_cfg, str):
        model_cfg = {"preset": model_cfg}
    if isinstance(model_cfg, dict):
        fields = dict(model_cfg)
        preset = fields.pop("preset", None)
        if fields.get("vocab_size") is None and vocab_size is not None:
            fields["vocab_size"] = vocab_size
        model_cfg = get_preset(preset, **fields) if preset else ModelConfig.from_dict(fields)
    if not isinstance(model_cfg, ModelConfig):
        raise ConfigError(f"model: expected a ModelConfig, a preset name or a mapping of its fields, got {model_cfg!r}")
    if vocab_size is None:
        return model_cfg
    require(
        model_cfg.vocab_size >= vocab_size,
        "vocab_size",
        f"the model has {model_cfg.vocab_size} token ids but the data uses {vocab_size}; set vocab_size={vocab_size}",
    )
    return model_cfg


# --------------------------------------------------------------------------- one run


SECTIONS = {"model": ModelConfig, "train": TrainConfig}


@dataclass
class RunConfig(ConfigBase):
    """What one training run is: its model and how it trains. Studies vary it with dotted overrides.

    `RunConfig.build(model, train, vocab_size)` takes the spellings people write (a preset name,
    {"preset": name, **fields}, plain fields) once, at the edge; from there on the configs travel typed.
    """

    model: ModelConfig
    train: TrainConfig

    @classmethod
    def build(
        cls,
        model: ModelConfig | dict | str,
        train: TrainConfig | dict | None = None,
        vocab_size: int | None = None,
        *,
        context: str = "",
    ) -> RunConfig:
        try:
            train = train if isinstance(train, TrainConfig) else TrainConfig.from_dict(dict(train or {}))
            return cls(model_config(model, vocab_size), train)
        except ConfigError as exc:
            raise ConfigError(f"{context}{exc}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """{"model": ..., "train": ...} as written to config.json and hand-offs (a preset name is allowed for the
        model)."""
        if not isinstance(data, dict) or "model" not in data or set(data) - {"model", "train"}:
            keys = sorted(data) if isinstance(data, dict) else data
            raise ConfigError(f"RunConfig: expected a mapping with keys 'model' and 'train', got {keys!r}")
        return cls.build(data["model"], data.get("train"))

    def override(self, overrides: dict[str, Any], *, context: str = "") -> RunConfig:
        """A copy with dotted overrides applied: {"train.lr": 1e-3, "train.betas.1": 0.99, "model.preset": "exp7"}.

        Keys are checked first (an unknown one raises ConfigError with a did-you-mean); each config
        is then rebuilt with `dataclasses.replace`, so the values pass the same validation as a new
        config. "model.preset" starts the model from that preset (keeping vocab_size) before the
        other model keys apply.
        """
        try:
            return self._override(overrides)
        except ConfigError as exc:
            raise ConfigError(f"{context}{exc}") from None

    def _override(self, overrides: dict[str, Any]) -> RunConfig:
        if not isinstance(overrides, dict):
            raise ConfigError(f"overrides: expected a mapping of dotted keys to values, got {overrides!r}")
        changes: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
        for key, value in overrides.items():
            section, name, index = parse_key(key)
            if index is not None:
                items = list(changes[section].get(name, getattr(getattr(self, section), name)))
                require(index < len(items), key, f"index {index} is out of range for {name} with {len(items)} values")
                items[index] = value
                value = items
            changes[section][name] = value
        preset = changes["model"].pop("preset", None)
        model = (
            get_preset(preset, vocab_size=self.model.vocab_size, **changes["model"])
            if preset
            else dataclasses.replace(self.model, **changes["model"])
        )
        return RunConfig(model, dataclasses.replace(self.train, **changes["train"]))


def valid_keys(section: str) -> list[str]:
    names = SECTIONS[section].field_names()
    return ["preset", *names] if section == "model" else names


def parse_key(key: str) -> tuple[str, str, int | None]:
    """'train.lr' -> ('train', 'lr', None); 'train.betas.1' -> ('train', 'betas', 1); ConfigError otherwise."""
    parts = str(key).split(".")
    all_keys = [f"{s}.{k}" for s in SECTIONS for k in valid_keys(s)]
    if len(parts) not in (2, 3) or parts[0] not in SECTIONS:
        close = difflib.get_close_matches(str(key), all_keys, n=1) or [
            f"{s}.{parts[-1]}" for s in SECTIONS if parts[-1] in valid_keys(s)
        ]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"override {key!r}: keys are 'model.<field>' or 'train.<field>' (e.g. 'train.lr', 'model.n_kv_head').{hint}"
        )
    section, name = parts[0], parts[1]
    keys = valid_keys(section)
    if name not in keys:
        close = difflib.get_close_matches(name, keys, n=1)
        hint = f" Did you mean '{section}.{close[0]}'?" if close else ""
        raise ConfigError(f"override {key!r}: {section} has no field {name!r}.{hint} Valid {section} keys: {keys}")
    if len(parts) == 2:
        return section, name, None
    defaults = {f.name: f.default for f in dataclasses.fields(SECTIONS[section])}
    if not parts[2].isdigit() or not isinstance(defaults.get(name), (tuple, list)):
        raise ConfigError(f"override {key!r}: only list fields take an index (e.g. 'train.betas.1' for beta2)")
    return section, name, int(parts[2])
