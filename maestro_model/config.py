"""Training configuration: one TOML file plus ``section.key=value`` overrides -> a frozen :class:`TrainConfig`.

Sections: ``[data]``, ``[model]`` (with an optional ``[model.options]`` table passed to ``build_model``),
``[train]`` and one table per phase (``[pretrain]``, ``[probe]``, ``[finetune]``). Defaults are the official
TreeSatAI-TS protocol (paper Table 9, per-device batch 32 on 3 GPUs); an unknown key is an error that lists the
valid ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from maestro_data.errors import MaestroError

PHASES = ("pretrain", "probe", "finetune")
PRECISIONS = ("auto", "no", "bf16", "fp16")
# keys that only say where/how a run is logged or stored: they may change when a run is resumed
# (train.threads and train.deterministic too: a resumed job may land on another machine; the trainer warns that its
# bits may then differ)
RUN_ONLY = {"data.index", "data.num_workers", "data.cache_dir", "data.cache_limit_gb", "data.retries",
            "data.timeout_s", "train.output_dir", "train.resume", "train.checkpoint_every",
            "train.keep_checkpoints", "train.log_every", "train.trace", "train.exit_after_steps", "train.quiet",
            "train.threads", "train.deterministic", "train.overwrite"}
# keys that no longer exist, with why: a config naming one is refused with that reason; a checkpoint that recorded
# one still resumes (the key never changed what was trained)
RETIRED = {"data.fold": "PASTIS-HD folds are chosen when building the dataset (maestro-data build pastis-hd --fold "
                        "K); the shards hold that fold's splits. Delete the key"}


class ConfigError(MaestroError):
    """A training configuration is invalid (unknown key, wrong type, inconsistent value)."""


@dataclass(frozen=True)
class DataConfig:
    manifest: str = "treesatai-ts"  # built-in manifest name or path to a manifest TOML
    index: str = ""                 # shard index.json (or its folder), a path or URL
    subset: int = 100               # % of the training split(s): 100 or a tier the shards hold (build --percents)
    num_workers: int = 2            # loader worker processes per rank
    cache_dir: str = ""             # node-local cache of remote shards ("": none); see the README's streaming section
    cache_limit_gb: float = 0.0     # LRU bound of cache_dir (0: unbounded)
    retries: int = 5                # per remote read, transient failures only
    timeout_s: float = 60.0         # per connect and socket read of a remote request


@dataclass(frozen=True)
class ModelSection:
    size: str = "base"
    fusion: str = "inter-group"
    multispectral: str = "joint"
    inter_depth: int = -1           # -1: the fusion mode's default (3 for inter-group, else 0)
    options: dict = field(default_factory=dict)  # other build_model keywords (embed_dim, depth, mask_ratio, ...)


@dataclass(frozen=True)
class PhaseConfig:
    epochs: int = 0                 # 0 skips the phase
    base_lr: float = 1e-5           # Table 9 base learning rate
    batch_size: int = 32            # per device
    grad_accum: int = 1
    eval_every: int = 1             # validate every k epochs (0: never); the last epoch always validates


@dataclass(frozen=True)
class TrainSection:
    seed: int = 42
    precision: str = "auto"         # auto: bf16 on a GPU that supports it, fp32 on CPU
    lr_scaling: str = "official"    # official: base*sqrt(B/3); paper: base*sqrt(B)
    final_lr: str = "official"      # official: 1e-7*peak pretrain/probe; paper: 1e-4*peak (finetune: peak/2)
    ema: bool = True
    output_dir: str = "runs/maestro"
    resume: str = ""                # "" | "auto" (latest checkpoint in output_dir) | a checkpoint folder
    overwrite: bool = False         # replace another run's outputs of these phases in output_dir (else refused)
    checkpoint_every: int = 0       # optimizer steps between checkpoints (0: at epoch ends only)
    keep_checkpoints: int = 2
    init: str = ""                  # weights to start from: official IGNF .ckpt, state dict or our safetensors
    init_which: str = "model"       # model | ema_model (official checkpoints hold both)
    init_strict: bool = True        # false: load what fits (a transfer), refused when the shared encoder would not
    init_force: bool = False        # non-strict init even when encoder tensors of the shared modalities stay random
    init_settings: str = "check"    # check | warn | ignore: settings the init checkpoint records vs the model's
    init_ema: str = "checkpoint"    # checkpoint: the EMA starts from the file's ema_model (official) | restart
    init_trust: bool = False        # unpickle the init file fully (runs its code): only for files you trust
    cpu: bool = False               # force CPU even where a GPU exists
    threads: int = 0                # intra-op CPU threads per process (0: torch's default). CPU sums are split per
                                    # thread, so bit-identical (resumed) CPU runs need the same count throughout
    log_every: int = 10             # optimizer steps between loss reductions (one all-reduce and host read each):
                                    # steps.jsonl, the progress bar and trackers are written then
    deterministic: bool = False     # torch deterministic algorithms (+ CUBLAS_WORKSPACE_CONFIG, no cuDNN autotune)
    trace: bool = False             # per-rank JSONL of every step's loss and tile ids (tests, debugging)
    exit_after_steps: int = 0       # simulate a preemption: hard exit after this many optimizer steps (tests)
    quiet: bool = False


PHASE_DEFAULTS = {"pretrain": PhaseConfig(epochs=100, base_lr=3e-5), "probe": PhaseConfig(epochs=10, base_lr=1e-5),
                  "finetune": PhaseConfig(epochs=50, base_lr=1e-5)}
SECTIONS = {"data": DataConfig, "model": ModelSection, "train": TrainSection, **dict.fromkeys(PHASES, PhaseConfig)}


@dataclass(frozen=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    pretrain: PhaseConfig = PHASE_DEFAULTS["pretrain"]
    probe: PhaseConfig = PHASE_DEFAULTS["probe"]
    finetune: PhaseConfig = PHASE_DEFAULTS["finetune"]

    def phase(self, name: str) -> PhaseConfig:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML text (loadable by :func:`load_config`)."""
        lines = []
        for sec, values in self.to_dict().items():
            options = values.pop("options", None)
            lines.append(f"[{sec}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            if options:
                lines.append(f"[{sec}.options]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in options.items()]
            lines.append("")
        return "\n".join(lines)

    def fingerprint(self) -> dict:
        """The settings a resumed run must share with the checkpoint (everything except :data:`RUN_ONLY`)."""
        return {k: v for k, v in flatten(self.to_dict()).items() if k not in RUN_ONLY}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "options":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]


def _coerce(key: str, value: Any, kind: Any, origin: str) -> Any:
    kind = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict}.get(kind, kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{origin}: {key}: expected a table, got {value!r}")
        return dict(value)
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise ConfigError(f"{origin}: {key}: expected {kind.__name__}, got {value!r}")
    return value


def parse_value(text: str) -> Any:
    """A command-line value as TOML (``3``, ``1e-4``, ``true``, ``"x"``), falling back to the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_config(raw: dict, overrides: dict[str, Any] | None = None, origin: str = "<config>") -> TrainConfig:
    """Validate ``raw`` (TOML tables) with dotted-key ``overrides`` applied on top -> :class:`TrainConfig`."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in (overrides or {}).items():
        sec, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override {key!r} must be section.key (valid keys: {', '.join(_valid_keys())})")
        if name.startswith("options."):
            raw.setdefault(sec, {}).setdefault("options", {})[name.removeprefix("options.")] = value
        else:
            raw.setdefault(sec, {})[name] = value
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{origin}: unknown section {unknown[0]!r} (valid sections: {', '.join(SECTIONS)})")
    built = {}
    for sec, cls in SECTIONS.items():
        table = raw.get(sec, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{origin}: {sec} must be a table")
        names = {f.name: f for f in fields(cls)}
        retired = sorted(f"{sec}.{k}" for k in table if f"{sec}.{k}" in RETIRED)
        if retired:
            raise ConfigError(f"{origin}: {retired[0]} was removed: {RETIRED[retired[0]]}")
        bad = sorted(set(table) - set(names))
        if bad:
            raise ConfigError(f"{origin}: unknown key {sec}.{bad[0]} (valid keys of [{sec}]: {', '.join(names)})")
        default = PHASE_DEFAULTS.get(sec) or cls()
        values = {k: _coerce(f"{sec}.{k}", v, names[k].type, origin) for k, v in table.items()}
        built[sec] = dataclasses.replace(default, **values)
    cfg = TrainConfig(**built)
    _validate(cfg, origin)
    return cfg


def _validate(cfg: TrainConfig, origin: str) -> None:
    def bad(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{origin}: {key}: {msg}")

    if not 1 <= cfg.data.subset <= 100:
        raise bad("data.subset", f"must be a percentage 1..100 (a tier of the shards, or 100), got {cfg.data.subset}")
    if cfg.data.num_workers < 0:
        raise bad("data.num_workers", "must be >= 0")
    if cfg.data.retries < 0 or cfg.data.timeout_s <= 0 or cfg.data.cache_limit_gb < 0:
        raise bad("data.retries/timeout_s/cache_limit_gb", "retries and cache_limit_gb must be >= 0, timeout_s > 0")
    if cfg.train.precision not in PRECISIONS:
        raise bad("train.precision", f"must be one of {', '.join(PRECISIONS)}, got {cfg.train.precision!r}")
    for key in ("lr_scaling", "final_lr"):
        if getattr(cfg.train, key) not in ("official", "paper"):
            raise bad(f"train.{key}", f"must be official or paper, got {getattr(cfg.train, key)!r}")
    if cfg.train.init_which not in ("model", "ema_model"):
        raise bad("train.init_which", f"must be model or ema_model, got {cfg.train.init_which!r}")
    if cfg.train.init_settings not in ("check", "warn", "ignore"):
        raise bad("train.init_settings", f"must be check, warn or ignore, got {cfg.train.init_settings!r}")
    if cfg.train.init_ema not in ("checkpoint", "restart"):
        raise bad("train.init_ema", f"must be checkpoint or restart, got {cfg.train.init_ema!r}")
    if cfg.train.resume and cfg.train.overwrite:
        raise bad("train.overwrite", f"contradicts train.resume = {cfg.train.resume!r}: resume continues the run in "
                                     "output_dir, overwrite replaces it; give one")
    for key in ("checkpoint_every", "exit_after_steps", "threads"):
        if getattr(cfg.train, key) < 0:
            raise bad(f"train.{key}", "must be >= 0")
    if cfg.train.keep_checkpoints < 1 or cfg.train.log_every < 1:
        raise bad("train", "keep_checkpoints and log_every must be >= 1")
    for p in PHASES:
        ph = cfg.phase(p)
        if ph.epochs < 0 or ph.eval_every < 0:
            raise bad(f"{p}.epochs", "epochs and eval_every must be >= 0")
        if ph.batch_size < 1 or ph.grad_accum < 1:
            raise bad(f"{p}.batch_size", "batch_size and grad_accum must be >= 1")
        if not ph.base_lr > 0:
            raise bad(f"{p}.base_lr", f"must be > 0, got {ph.base_lr}")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a TOML config (or start from the defaults when ``path`` is None) and apply ``overrides``."""
    raw: dict = {}
    origin = "<defaults>"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return build_config(raw, overrides, origin)
