"""Typed run configuration: YAML recipe + dotted command-line overrides, validated before any work starts.

Every field has a default, so `metadistil-scale train` with no flags runs the embedded recipe. A recipe file
sets any subset of fields; `--set train.batch_size=16` style overrides are applied last. Unknown keys, wrong
types and out-of-range values all raise ConfigError naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EMBEDDED_MINILM = "embedded:minilm-l6"
METHODS = ("finetune", "kd", "metadistil", "metadistil-no-pilot")
SOFT_LOSSES = ("kl", "mse")
U_MODES = ("jvp", "finite-difference", "unrolled")
SCHEDULES = ("lean", "fast")
OPTIMIZERS = ("adamw", "sgd")
LR_SCHEDULES = ("linear", "step", "constant")
# Image tasks take CIFAR-style CNNs ("cv:<name>" model sources); every other task is text.
IMAGE_TASKS = ("fashion_mnist", "cifar100")
DTYPES = ("float32", "float64", "bfloat16")
CPU_ALLOCATORS = ("retain", "system")


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key."""


@dataclass
class DataConfig:
    task: str = "rotten_tomatoes"
    data_files: dict[str, str] | None = None
    split_seed: int = 0
    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    quiz_fraction: float = 0.1
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    max_length: int = 48  # the critic snippets are short: 3.8% of train exceeds 48 tokens (mean 27)


@dataclass
class LoraConfig:
    """Low-rank adapters (PEFT LoRA) on a model: only the adapters (and, if asked, the head) are trained."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # Module names to adapt; null = PEFT's default for the architecture (BERT: query and value).
    target_modules: list[str] | None = None
    # Train the classification head in full too: null = yes for the student (its head starts untrained), no
    # for the teacher (its fine-tuned head stays fixed and only the adapters are meta-learned).
    train_head: bool | None = None
    # Besides the adapters (<folder>/adapter, PEFT format), save the merged full weights in the folder itself.
    save_merged: bool = True


@dataclass
class ModelConfig:
    # A local folder or hub name for the teacher's starting point; the embedded MiniLM by default.
    teacher: str = EMBEDDED_MINILM
    # An already fine-tuned teacher folder: skips the fine-tuning stage.
    teacher_checkpoint: str | None = None
    # The student's pretrained source; the student keeps its first `student_layers` layers (the paper's recipe).
    student: str = EMBEDDED_MINILM
    student_layers: int | None = 3
    # Forward-mode AD (the jvp u-mode) needs an attention implementation that supports it.
    attn_implementation: str = "eager"
    # LoRA adapters: the student's are what it trains; the teacher's are what MetaDistil meta-learns (the teacher's
    # own fine-tuning stage trains it in full; under KD its adapters stay zero and change nothing).
    student_lora: LoraConfig | None = None
    teacher_lora: LoraConfig | None = None
    # Activation checkpointing (text models): keep each layer's input only and recompute the layer in the backward,
    # trading compute for activation memory. The teacher's: its forward-with-graph and meta backward; the
    # student's: the pilot and the real step (the quiz at the pilot weights, the JVP and finite differences run
    # without it: see meta.py).
    teacher_activation_checkpointing: bool = False
    student_activation_checkpointing: bool = False


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5e-5
    weight_decay: float = 0.01
    momentum: float = 0.9
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    # After warmup: `linear` decays to 0 at the end; `step` multiplies the lr by `gamma` at each milestone
    # (fractions of the model's optimizer steps, e.g. [0.625, 0.75, 0.875] = epochs 150/180/210 of 240);
    # `constant` keeps it.
    schedule: str = "linear"
    milestones: list[float] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class DistillTermConfig:
    """One term of a distillation objective (metadistil_scale/objectives.py lists the kinds)."""

    kind: str = "kl"
    weight: float = 1.0
    temperature: float | None = None  # logit terms; None: distill.temperature
    # Hidden-state and attention terms: "skip", "last", "uniform", "top" or explicit [student_layer, teacher_layer]
    # pairs, counted as transformers' hidden_states (0 = the embeddings; attention maps start at layer 1).
    layers: str | list[list[int]] = "skip"
    beta: float = 0.5  # jsd: the mixture weight of the teacher
    # mse: "sum" over classes (as the `mse` soft loss), or "official": T² x the mean over classes (the official
    # MetaDistil GLUE code's F.mse_loss over N x C elements, times T²).
    normalization: str = "sum"


@dataclass
class DistillConfig:
    # Weight of the hard loss (CE, or MSE for regression). Without `terms`, the soft loss weighs 1 - alpha.
    alpha: float = 0.5
    temperature: float = 5.0
    soft_loss: str = "kl"
    # When given, the soft part of the objective: these terms with their own weights (soft_loss is then unused).
    terms: list[DistillTermConfig] = field(default_factory=list)


@dataclass
class MetaConfig:
    pilot_lr: float = 5e-5
    u_mode: str = "jvp"
    schedule: str = "lean"
    fd_epsilon: float = 1e-3
    teacher_optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, weight_decay=0.0))
    # Weight of the teacher's own CE on the train batch inside its meta-loss. Default 1: with the paper's
    # teacher lr alone an independent run saw the teacher drift off the task (82.8% -> 62.9% test).
    teacher_ce_weight: float = 1.0
    # The teacher is meta-updated every `interval` steps and stays frozen for the first `frozen_steps`.
    interval: int = 1
    frozen_steps: int = 0
    quiz_batch_size: int = 32
    quiz_seed: int = 1234
    # The student's quiz forwards (the meta-loss and its gradient) in train mode: dropout on, BatchNorm on batch
    # statistics. The official GLUE code runs them without dropout (false).
    quiz_train_mode: bool = True
    # Every teacher update reads the whole quiz set (micro-batches of quiz_batch_size) instead of one batch, as the
    # official GLUE code: exact, and as many quiz forwards+backwards per update as the set has micro-batches.
    quiz_whole_set: bool = False


@dataclass
class TeacherCacheConfig:
    """The frozen teacher's logits kept by input row and reused (teacher_cache.py): exact, for KD and the
    first `meta.frozen_steps` steps of MetaDistil."""

    enabled: bool = False
    # Shared by every run pointed at it; a folder per teacher inside (default: <output_dir>/teacher_cache).
    dir: str | None = None


@dataclass
class StageConfig:
    """One training stage's budget and optimizer (teacher fine-tuning, or the student's distillation)."""

    batch_size: int = 32
    # Gradient accumulation: micro-batches of this size (None = the whole batch at once).
    micro_batch_size: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class Config:
    output_dir: str = "runs/default"
    methods: list[str] = field(default_factory=lambda: ["kd", "metadistil"])
    seed: int = 0
    # `metadistil-scale experiment` runs every method once per seed (`seed` is then ignored).
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    device: str = "auto"
    # On CPU: "retain" keeps freed memory in the heap for the next pass (faster steps), "system" leaves
    # glibc's defaults.
    cpu_allocator: str = "retain"
    dtype: str = "float32"
    eval_batch_size: int = 128
    eval_every: int = 50
    log_every: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    # The default budget is sized for the main job to take under 10 minutes on a 2-core CPU from measured step
    # times (benchmarks/RESULTS.md); a full epoch of the embedded task is 286 steps of 32.
    teacher_finetune: StageConfig = field(
        default_factory=lambda: StageConfig(max_steps=150, optim=OptimConfig(lr=1e-4))
    )
    student_train: StageConfig = field(default_factory=lambda: StageConfig(max_steps=100, optim=OptimConfig(lr=2e-4)))
    deepspeed_teacher: str | None = None
    deepspeed_student: str | None = None
    # Where every metrics.jsonl record also goes (trackers.py): any of tensorboard, wandb, mlflow; their local
    # files under `tracking_dir` (default: <output_dir>/tracking).
    trackers: list[str] = field(default_factory=list)
    tracking_dir: str | None = None
    teacher_cache: TeacherCacheConfig = field(default_factory=TeacherCacheConfig)


# ---------------------------------------------------------------- loading


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Coerce/validate one value against a type hint; int is accepted where float is expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_hint_name(hint)}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_check_type(k, kt, key): _check_type(v, vt, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        # inf/nan pass every range check below and then cannot train (an infinite lr, infinite epochs).
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if hint in (int, float, str, bool):
        if isinstance(value, bool) and hint is not bool:
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
        if not isinstance(value, hint):
            raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"{key}: unsupported type {hint}")


def _hint_name(hint: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(hint))


def _build(cls: type, raw: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """`raw` merged into `base` (default: the class's defaults), key by key at every depth.

    A section that a recipe or an override names keeps every field it does not name from the recipe below it:
    `--set student_train.max_steps=500` leaves the default student lr of 2e-4 as it is, rather than rebuilding
    the section from StageConfig's class defaults.
    """
    base = cls() if base is None else base
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key '{where}' (known: {', '.join(sorted(names))})")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            kwargs[key] = _build(type(current), value, where, base=current)
        else:
            kwargs[key] = _check_type(value, hints[key], where)
    return dataclasses.replace(base, **kwargs)


def _merge(tree: dict[str, Any], key: str, value: Any) -> None:
    """tree[key] = value, merging mappings into the mapping already there instead of replacing it."""
    if isinstance(value, dict) and isinstance(tree.get(key), dict):
        for sub_key, sub_value in value.items():
            _merge(tree[key], sub_key, sub_value)
    else:
        tree[key] = value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    _merge(node, parts[-1], value)


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads '1e-5' (no dot) as a string; in a recipe or on the command line it is the float a user means."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-5' -> ('train.lr', 1e-05); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected KEY=VALUE, e.g. student_train.batch_size=16")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_YamlLoader) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({err.problem})") from err
    return key.strip(), value


def shipped_recipes() -> Path:
    """The folder of the recipes shipped with the package: configs/ installs as metadistil_scale/configs,
    and a source checkout has it beside the package."""
    installed = Path(__file__).resolve().parent / "configs"
    return installed if installed.is_dir() else installed.parents[1] / "configs"


def read_raw_config(path: str | Path | None, overrides: list[str] | None) -> dict[str, Any]:
    """A recipe file (optional) with dotted overrides applied: the raw mapping a config class is built from.
    A bare name that is not a file here (`glue_sst2`) is the shipped recipe of that name."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and path.parent == Path("."):
            shipped = shipped_recipes() / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
            if not shipped.is_file():
                names = ", ".join(sorted(p.stem for p in shipped.parent.glob("*.yaml")))
                raise ConfigError(f"config file not found: {path} (nor a shipped recipe: {names})")
            path = shipped
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.load(path.read_text(), Loader=_YamlLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    config = _build(Config, read_raw_config(path, overrides))
    validate(config)
    return config


def config_to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """The inverse of config_to_dict, validated (e.g. a resolved config shipped to remote workers)."""
    config = _build(Config, raw)
    validate(config)
    return config


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))


def config_fingerprint(obj: Any) -> str:
    """A stable hash of (part of) a config, to recognise finished stages and foreign checkpoints."""
    import hashlib

    blob = json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- validation


def require(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def validate_optim(o: OptimConfig, key: str) -> None:
    require(o.name in OPTIMIZERS, f"{key}.name", f"one of {OPTIMIZERS}", o.name)
    require(o.lr > 0, f"{key}.lr", "> 0 (an lr of 0 trains nothing)", o.lr)
    require(o.weight_decay >= 0, f"{key}.weight_decay", ">= 0", o.weight_decay)
    require(0 <= o.momentum < 1, f"{key}.momentum", "in [0, 1)", o.momentum)
    require(0 <= o.warmup_ratio < 1, f"{key}.warmup_ratio", "in [0, 1)", o.warmup_ratio)
    require(o.max_grad_norm is None or o.max_grad_norm > 0, f"{key}.max_grad_norm", "> 0 or null", o.max_grad_norm)
    require(o.schedule in LR_SCHEDULES, f"{key}.schedule", f"one of {LR_SCHEDULES}", o.schedule)
    require(all(0 < m < 1 for m in o.milestones) and o.milestones == sorted(set(o.milestones)),
            f"{key}.milestones", "increasing fractions in (0, 1)", o.milestones)
    require(0 < o.gamma <= 1, f"{key}.gamma", "in (0, 1]", o.gamma)


def validate_stage(s: StageConfig, key: str) -> None:
    require(s.batch_size >= 1, f"{key}.batch_size", ">= 1", s.batch_size)
    if s.micro_batch_size is not None:
        require(
            1 <= s.micro_batch_size <= s.batch_size and s.batch_size % s.micro_batch_size == 0,
            f"{key}.micro_batch_size",
            f"a divisor of batch_size={s.batch_size}",
            s.micro_batch_size,
        )
    require(s.epochs > 0, f"{key}.epochs", "> 0", s.epochs)
    require(s.max_steps is None or s.max_steps >= 1, f"{key}.max_steps", ">= 1 or null", s.max_steps)
    validate_optim(s.optim, f"{key}.optim")


def validate_distill(d: DistillConfig, key: str = "distill") -> None:
    require(0 <= d.alpha <= 1, f"{key}.alpha", "in [0, 1]", d.alpha)
    require(0.05 <= d.temperature <= 100, f"{key}.temperature", "in [0.05, 100]", d.temperature)
    require(d.soft_loss in SOFT_LOSSES, f"{key}.soft_loss", f"one of {SOFT_LOSSES}", d.soft_loss)
    if d.terms:
        from metadistil_scale.objectives import validate_term  # the term registry lives beside the losses

        for i, term in enumerate(d.terms):
            validate_term(term, f"{key}.terms[{i}]")


def validate_objective(c: Config) -> None:
    """distill.* alone, then its terms against the task (no softmax term on a regression) and the models'
    config files (layer maps, attention heads and implementation), before any work starts."""
    validate_distill(c.distill)
    if c.distill.terms:
        from metadistil_scale.objectives import check_terms_fit

        check_terms_fit(c)


def validate_lora(lora: LoraConfig, key: str, cv: bool = False) -> None:
    require(lora.r >= 1, f"{key}.r", ">= 1", lora.r)
    require(lora.alpha > 0, f"{key}.alpha", "> 0", lora.alpha)
    require(0 <= lora.dropout < 1, f"{key}.dropout", "in [0, 1)", lora.dropout)
    if lora.target_modules is not None or cv:  # PEFT knows no default for the CNNs
        require(bool(lora.target_modules), f"{key}.target_modules",
                "a non-empty list of module names" + (" (no default for a 'cv:' model)" if cv else ""),
                lora.target_modules)


def validate_meta(m: MetaConfig, key: str = "meta") -> None:
    require(m.pilot_lr > 0, f"{key}.pilot_lr", "> 0", m.pilot_lr)
    require(m.u_mode in U_MODES, f"{key}.u_mode", f"one of {U_MODES}", m.u_mode)
    require(m.schedule in SCHEDULES, f"{key}.schedule", f"one of {SCHEDULES}", m.schedule)
    require(m.fd_epsilon > 0, f"{key}.fd_epsilon", "> 0", m.fd_epsilon)
    require(m.teacher_ce_weight >= 0, f"{key}.teacher_ce_weight", ">= 0", m.teacher_ce_weight)
    require(m.interval >= 1, f"{key}.interval", ">= 1", m.interval)
    require(m.frozen_steps >= 0, f"{key}.frozen_steps", ">= 0", m.frozen_steps)
    require(m.quiz_batch_size >= 1, f"{key}.quiz_batch_size", ">= 1", m.quiz_batch_size)
    validate_optim(m.teacher_optim, f"{key}.teacher_optim")


def validate_run(c: Any) -> None:
    """The run-level keys of either config kind (classification or causal LM): methods, seeds, device, CPU
    allocator, dtype and the evaluation and logging cadences."""
    require(len(c.methods) > 0, "methods", "at least one method", c.methods)
    for i, m in enumerate(c.methods):
        require(m in METHODS, f"methods[{i}]", f"one of {METHODS}", m)
    require(len(set(c.methods)) == len(c.methods), "methods", "no repeated method", c.methods)
    require(len(c.seeds) > 0 and len(set(c.seeds)) == len(c.seeds), "seeds", "a non-empty list of distinct seeds",
            c.seeds)
    require(c.device in ("auto", "cpu", "cuda"), "device", "auto, cpu or cuda", c.device)
    require(c.cpu_allocator in CPU_ALLOCATORS, "cpu_allocator", f"one of {CPU_ALLOCATORS}", c.cpu_allocator)
    require(c.dtype in DTYPES, "dtype", f"one of {DTYPES}", c.dtype)
    for key in ("eval_batch_size", "eval_every", "log_every"):
        require(getattr(c, key) >= 1, key, ">= 1", getattr(c, key))


def validate_training(c: Any) -> None:
    """The keys both config kinds share past the run level: the meta step, both stages, DeepSpeed, trackers."""
    validate_meta(c.meta)
    validate_stage(c.teacher_finetune, "teacher_finetune")
    validate_stage(c.student_train, "student_train")
    validate_deepspeed(c)
    validate_trackers(c.trackers)


def validate(c: Config) -> None:
    validate_run(c)
    d = c.data
    for key in ("dev_fraction", "test_fraction", "quiz_fraction"):
        require(0 < getattr(d, key) < 1, f"data.{key}", "in (0, 1)", getattr(d, key))
    require(d.dev_fraction + d.test_fraction < 0.9, "data.dev_fraction", "dev + test fractions < 0.9", d.dev_fraction)
    require(d.max_length >= 8, "data.max_length", ">= 8", d.max_length)
    for key in ("max_train_examples", "max_eval_examples"):
        v = getattr(d, key)
        require(v is None or v >= 1, f"data.{key}", ">= 1 or null", v)
    image = d.task in IMAGE_TASKS
    for split, file in (d.data_files or {}).items():
        if image:  # one archive or folder holds every split of an image data set
            require(split == "train", f"data.data_files.{split}", "only the key 'train' for an image task", split)
            if not Path(file).exists():
                raise ConfigError(f"data.data_files.{split}: file or folder not found: {file}")
            continue
        require(split in ("train", "validation", "test"), f"data.data_files.{split}", "train, validation or test", split)
        if not Path(file).is_file():
            raise ConfigError(f"data.data_files.{split}: file not found: {file}")
    m = c.model
    require(m.student_layers is None or m.student_layers >= 1, "model.student_layers", ">= 1 or null", m.student_layers)
    for key in ("teacher", "student"):
        _check_model_source(getattr(m, key), f"model.{key}")
        is_cv = getattr(m, key).startswith("cv:")
        require(is_cv == image, f"model.{key}", f"a 'cv:<name>' source for the image task {d.task!r}" if image
                else f"a text model for the text task {d.task!r} ('cv:' sources need {' or '.join(IMAGE_TASKS)})",
                getattr(m, key))
    if image:  # CNNs are built at their named depth
        require(m.student_layers is None, "model.student_layers", "null for a 'cv:' student", m.student_layers)
    for key in ("teacher_activation_checkpointing", "student_activation_checkpointing"):
        require(not (getattr(m, key) and image), f"model.{key}", "false for a 'cv:' model (text models only)",
                getattr(m, key))
    for key in ("student_lora", "teacher_lora"):
        if getattr(m, key) is not None:
            validate_lora(getattr(m, key), f"model.{key}", cv=image)
    if m.teacher_checkpoint is not None and not Path(m.teacher_checkpoint).is_dir():
        raise ConfigError(f"model.teacher_checkpoint: folder not found: {m.teacher_checkpoint}")
    validate_objective(c)
    if image and c.distill.terms:
        from metadistil_scale.objectives import require_logit_terms

        require_logit_terms(c.distill, "the CNNs of an image task give no hidden states to distil")
    validate_training(c)
    # A sharded teacher's forward is collective: every rank must run it, hit or miss.
    require(not (c.teacher_cache.enabled and c.deepspeed_teacher), "teacher_cache.enabled",
            "false with deepspeed_teacher (a sharded teacher's forward involves every rank)", c.teacher_cache.enabled)


def validate_deepspeed(c: Any) -> None:
    """The `deepspeed_teacher` and `deepspeed_student` files of a config (either task kind) exist."""
    for key in ("deepspeed_teacher", "deepspeed_student"):
        v = getattr(c, key)
        if v is not None and not Path(v).is_file():
            raise ConfigError(f"{key}: DeepSpeed config not found: {v}")


def validate_trackers(trackers: list[str]) -> None:
    """Known names, each once, with its package installed (checked here, before any work starts)."""
    from metadistil_scale.trackers import TRACKER_PACKAGES, missing_package

    for i, name in enumerate(trackers):
        require(name in TRACKER_PACKAGES, f"trackers[{i}]", f"one of {tuple(TRACKER_PACKAGES)}", name)
    require(len(set(trackers)) == len(trackers), "trackers", "no repeated tracker", trackers)
    for name in trackers:
        package = missing_package(name)
        if package is not None:
            raise ConfigError(f"trackers: {name!r} needs the {package} package: pip install {package} "
                              "(or pip install 'metadistil-scale[trackers]')")


def _check_model_source(source: str, key: str) -> None:
    if source.startswith("cv:"):
        from metadistil_scale.models.cifar import CV_MODELS

        require(source[3:] in CV_MODELS, key, f"cv:<name> with a name in {', '.join(CV_MODELS)}", source)
        return
    if source == EMBEDDED_MINILM:
        return
    # A path-looking source must exist; anything else is taken as a hub name (only loadable online).
    looks_like_path = source.startswith((".", "/", "~")) or Path(source).exists()
    if looks_like_path and not Path(source).expanduser().is_dir():
        raise ConfigError(f"{key}: model folder not found: {source}")
