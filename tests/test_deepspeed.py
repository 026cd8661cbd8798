"""DeepSpeed ZeRO and data parallelism: 2 ranks with global batch B take the same steps as one process with B.

The launched checks run on the CPU (DS_ACCELERATOR=cpu, gloo) in a few launches that each run many jobs
(tests/_ds_worker.py), so the suite pays the start-up of 2 processes only a few times:
  - MetaDistil for teacher ZeRO 0/1/2/3 × student ZeRO 0/2 and KD for teacher ZeRO 0/3 × student ZeRO 0/2
    (KD's frozen teacher runs ZeRO 1/2 as stage 0), the student at ZeRO-3, the torch backend's
    own data parallelism, teacher ZeRO-3 with CPU offload, ZeRO-3 fine-tuning, and bf16 (loosely);
  - checkpoints at step 1 resumed in a second launch, at every teacher stage and both student stages;
  - the CLI under the deepspeed launcher, stopped and resumed under torchrun, against one plain process.
Compiled DeepSpeed ops are cached in the repository's .cache/ (ignored by git).
"""

from __future__ import annotations

import json
import os
import socket
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import _ds_worker as worker
import pytest
import torch

from metadistil_scale.backends import check_distributed
from metadistil_scale.config import Config, ConfigError, OptimConfig, load_config
from metadistil_scale.trainer import BatchStream

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
STEPS, SAVE_AT = 2, 1


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    env.pop("TRITON_INTERPRET", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], expect: int = 0, timeout: int = 600) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]


# ---------------------------------------------------------------- comparisons


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _update_error(got: list[torch.Tensor], want: list[torch.Tensor], start: list[torch.Tensor]) -> float:
    """‖got − want‖ / ‖want − start‖: relative to how far training moved, which is what a scaling bug changes."""
    moved = (_flat(want) - _flat(start)).norm()
    return float((_flat(got) - _flat(want)).norm() / moved) if moved > 0 else float((_flat(got) - _flat(want)).norm())


def _assert_same_run(got: dict, want: dict, method: str, tol: float = TOL, label: str = "") -> None:
    teacher, student = worker.initial_models(method)
    for role, start in (("teacher", teacher), ("student", student)):
        err = _update_error(got[role], want[role], [p.detach() for p in start.parameters()])
        assert err <= tol, f"{label}: {role} parameters off by {err:.2e} of their update"
    for key, value in want["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=max(tol, 1e-6)), f"{label}: {key}"


# ---------------------------------------------------------------- the launched jobs

META = [(t, s) for t in (0, 1, 2, 3) for s in (0, 2)]
META_RESUMED = {(0, 0), (1, 2), (2, 0), (3, 2)}  # every teacher stage, both student stages
# KD's teacher is frozen: ZeRO 1/2 have nothing to shard for it and run as stage 0 (checked without a launch).
KD = [(t, s) for t in (0, 3) for s in (0, 2)]
KD_RESUMED = {(0, 0), (3, 2)}


def _jobs() -> tuple[list[dict], list[dict]]:
    def job(name, method, teacher, student, save=False):
        return {"name": name, "method": method, "teacher": teacher, "student": student, "steps": STEPS,
                "save_at": SAVE_AT if save else None}

    first = [job(f"meta_t{t}_s{s}", "metadistil", f"zero{t}", f"zero{s}", (t, s) in META_RESUMED) for t, s in META]
    first += [job(f"kd_t{t}_s{s}", "kd", f"zero{t}", f"zero{s}", (t, s) in KD_RESUMED) for t, s in KD]
    first += [
        # The student at ZeRO-3: its meta passes run on a replica of the gathered parameters.
        job("meta_t3_s3", "metadistil", "zero3", "zero3", save=True),
        job("meta_t0_s3", "metadistil", "zero0", "zero3"),
        job("meta_torch", "metadistil", None, None, save=True),  # the torch backend, data-parallel by hand
        job("kd_torch", "kd", None, None, save=True),
        job("meta_offload", "metadistil", "zero3_offload", "zero1"),
        job("finetune_zero3", "finetune", None, "zero3", save=True),
        job("meta_bf16", "metadistil", "zero3_bf16", "zero2_bf16"),
    ]
    second = [dict(j, name=j["name"] + "_resumed", resume_from=j["name"], save_at=None) for j in first if j["save_at"]]
    return first, second


@pytest.fixture
def own_tmp():
    """A private temporary folder: pytest's numbered tmp folders can be rotated away by other pytest sessions
    that start while these minutes-long launches run."""
    with tempfile.TemporaryDirectory(prefix="metadistil-ds-") as folder:
        yield Path(folder)


@pytest.fixture(scope="module")
def launched():
    first, second = _jobs()
    with tempfile.TemporaryDirectory(prefix="metadistil-ds-jobs-") as folder:
        out = Path(folder)
        for name, jobs in (("first", first), ("second", second)):
            spec = out / f"{name}.json"
            spec.write_text(json.dumps(jobs))
            _run(_torchrun(str(REPO / "tests" / "_ds_worker.py"), str(spec), str(out)))
        yield out, first, second


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    """One process, the torch backend, whole batches."""
    return {m: worker.run_job({"name": m, "method": m, "teacher": None, "student": None, "steps": STEPS}, None)
            for m in ("metadistil", "kd", "finetune")}


@pytest.mark.slow
def test_two_ranks_at_every_zero_stage_equal_one_process(launched, references):
    out, first, _ = launched
    for job in first:
        got, want = torch.load(out / f"{job['name']}.pt"), references[job["method"]]
        if "bf16" in job["name"]:  # bf16 weights round away updates this small: it only tracks fp32 loosely
            for role in ("teacher", "student"):
                assert float((_flat(got[role]) - _flat(want[role])).norm() / _flat(want[role]).norm()) < 1e-2
            assert got["metrics"]["loss"] == pytest.approx(want["metrics"]["loss"], rel=1e-2)
            continue
        _assert_same_run(got, want, job["method"], label=job["name"])


@pytest.mark.slow
def test_resume_in_a_new_launch_ends_equal_to_an_uninterrupted_run(launched, references):
    out, _, second = launched
    assert {j["resume_from"] for j in second} >= {f"meta_t{t}_s{s}" for t, s in META_RESUMED}
    for job in second:
        got = torch.load(out / f"{job['name']}.pt")
        uninterrupted = torch.load(out / f"{job['resume_from']}.pt")
        _assert_same_run(got, uninterrupted, job["method"], tol=1e-6, label=job["name"])
        _assert_same_run(got, references[job["method"]], job["method"], label=job["name"])


# ---------------------------------------------------------------- the CLI under both launchers


def _tiny_model_folder(folder: Path) -> Path:
    """A 2-layer BERT with a character-level tokenizer: a real model folder, small enough for CPU tests."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + ".,!?'-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    return folder


def _recipe(tmp_path: Path) -> Path:
    model = str(_tiny_model_folder(tmp_path / "tiny"))
    recipe = {
        "methods": ["metadistil"], "seed": 0, "device": "cpu", "eval_every": 2, "log_every": 1,
        "data": {"max_train_examples": 64, "max_eval_examples": 16, "max_length": 24},
        "model": {"teacher": model, "teacher_checkpoint": model, "student": model, "student_layers": 1},
        "distill": {"alpha": 0.5, "temperature": 2.0},
        "meta": {"pilot_lr": 0.5, "quiz_batch_size": 8,
                 "teacher_optim": {"lr": 0.01, "warmup_ratio": 0.0, "max_grad_norm": 1.0}},
        "student_train": {"batch_size": 8, "micro_batch_size": 2, "max_steps": 2,
                          "optim": {"lr": 0.01, "warmup_ratio": 0.0, "max_grad_norm": 1.0}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def _weights(folder: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    return [state[k] for k in sorted(state)]


@pytest.mark.slow
def test_cli_under_deepspeed_launcher_then_resumed_under_torchrun(own_tmp):
    from metadistil_scale import cli

    tmp_path = own_tmp
    recipe = _recipe(tmp_path)
    zero = ["--deepspeed-teacher", "ds_configs/zero3.json", "--deepspeed-student", "ds_configs/zero2.json"]
    entry = ["train", "--config", str(recipe), "--output-dir", str(tmp_path / "ds"), *zero]
    # Stopped after one step (a planned stop: exit 0 under a launcher), then resumed under the other launcher.
    _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
          "--module", "metadistil_scale.launch.deepspeed_train", *entry, "--stop-after", "1"], expect=0)
    assert (tmp_path / "ds" / "metadistil" / "last" / "latest").is_file()
    _run(_torchrun("-m", "metadistil_scale.launch.deepspeed_train", *entry, "--resume"))

    assert cli.main(["train", "--config", str(recipe), "--output-dir", str(tmp_path / "one")]) == 0
    for sub in ("best", "best/teacher"):
        got, want = _weights(tmp_path / "ds" / "metadistil" / sub), _weights(tmp_path / "one" / "metadistil" / sub)
        err = float((_flat(got) - _flat(want)).norm() / _flat(want).norm())
        assert err <= TOL, f"{sub}: {err:.2e}"
    logs = [[json.loads(line) for line in (tmp_path / run / "metadistil" / "metrics.jsonl").read_text().splitlines()]
            for run in ("ds", "one")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2]
    for got, want in zip(*logs):
        for key in ("loss", "pilot_loss", "quiz_loss_before", "teacher_grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=TOL), key


@pytest.mark.slow
def test_experiment_under_torchrun_reports_once_and_matches_one_process(own_tmp):
    """`experiment` on 2 ranks: every rank trains, rank 0 alone writes and prints the report."""
    from metadistil_scale import cli

    recipe = _recipe(own_tmp)
    entry = ["experiment", "--config", str(recipe), "--set", "methods=[kd, metadistil]", "--set", "seeds=[0, 1]"]
    cmd = _torchrun("-m", "metadistil_scale.launch.deepspeed_train", *entry, "--output-dir", str(own_tmp / "two"))
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("summary: ") == 1

    assert cli.main([*entry, "--output-dir", str(own_tmp / "one")]) == 0
    two, one = (json.loads((own_tmp / run / "runs.json").read_text()) for run in ("two", "one"))
    assert [(r["method"], r["seed"]) for r in two] == [(r["method"], r["seed"]) for r in one]
    assert len(two) == 6  # (teacher, kd, metadistil) x 2 seeds
    for got, want in zip(two, one):
        assert got["metric"] == pytest.approx(want["metric"], abs=1e-9)
        assert [v for _, v in got.get("curve", [])] == pytest.approx([v for _, v in want.get("curve", [])],
                                                                     rel=TOL)


# ---------------------------------------------------------------- configs and bad input (no launch)


def _resolve(raw: dict, **kw):
    from metadistil_scale.backends.deepspeed_backend import resolve_ds_config

    args = dict(where="deepspeed_teacher (x.json)", optim=OptimConfig(), optim_key="meta.teacher_optim",
                micro_batch_size=4, grad_accum=2, world=2)
    args.update(kw)
    return resolve_ds_config(raw, **args)


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.stem)
def test_shipped_configs_are_explicit_and_resolve(path):
    raw = json.loads(path.read_text())
    assert isinstance(raw["gradient_clipping"], float)  # never DeepSpeed's silent default
    resolved = _resolve(raw)
    stage = int(path.stem.split("_")[0].removeprefix("zero"))
    assert resolved["zero_optimization"]["stage"] == stage
    assert resolved["bf16"]["enabled"] == path.stem.endswith("bf16")
    assert ("offload_optimizer" in resolved["zero_optimization"]) == ("offload" in path.stem)
    assert (resolved["train_batch_size"], resolved["train_micro_batch_size_per_gpu"],
            resolved["gradient_accumulation_steps"]) == (16, 4, 2)


def test_configs_the_shipped_set_covers():
    stems = {p.stem for p in (REPO / "ds_configs").glob("*.json")}
    for name in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        assert {name, f"{name}_bf16"} <= stems


@pytest.mark.parametrize("raw,match", [
    ({"zero_optimization": {"stage": 2}}, r"deepspeed_teacher \(x.json\): set 'gradient_clipping' explicitly"),
    ({"gradient_clipping": 0.5}, r"gradient_clipping=0.5 but the recipe's meta.teacher_optim.max_grad_norm is 1.0"),
    ({"gradient_clipping": "auto", "optimizer": {"type": "Adam"}}, r"remove 'optimizer'.*meta.teacher_optim"),
    ({"gradient_clipping": "auto", "train_batch_size": 32}, r"train_batch_size=32 but the recipe gives 16"),
    ({"gradient_clipping": "auto", "zero_optimization": {"stage": 4}}, r"zero_optimization.stage must be"),
])
def test_bad_deepspeed_configs_name_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        _resolve(raw)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_frozen_model_runs_zero1_and_zero2_as_stage0(stage):
    config = {"gradient_clipping": 1.0, "zero_optimization": {"stage": stage}}
    assert _resolve(config, optim=None)["zero_optimization"]["stage"] == 0
    assert _resolve(config)["zero_optimization"]["stage"] == stage


def test_missing_or_broken_config_files_name_the_key(tmp_path):
    from metadistil_scale.backends.deepspeed_backend import load_ds_config

    with pytest.raises(ConfigError, match="deepspeed_student: DeepSpeed config not found: nope.json"):
        load_ds_config("nope.json", "deepspeed_student")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="deepspeed_teacher: .*bad.json is not valid JSON"):
        load_ds_config(bad, "deepspeed_teacher")
    with pytest.raises(ConfigError, match="deepspeed_teacher: DeepSpeed config not found"):
        load_config(None, ["deepspeed_teacher=missing.json"])


def test_cli_flags_set_the_deepspeed_keys():
    from metadistil_scale.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--deepspeed-teacher", "ds_configs/zero3.json",
                                      "--deepspeed-student", "ds_configs/zero2.json"])
    cfg = config_from_args(args)
    assert (cfg.deepspeed_teacher, cfg.deepspeed_student) == ("ds_configs/zero3.json", "ds_configs/zero2.json")


@pytest.mark.parametrize("overrides,world,match", [
    (["student_train.batch_size=30"], 4, r"student_train.batch_size=30 is not divisible by the 4"),
    (["student_train.batch_size=32", "student_train.micro_batch_size=16"], 4,
     r"student_train.micro_batch_size=16 does not divide the per-rank batch 32/4=8"),
    (["meta.quiz_batch_size=10"], 4, r"meta.quiz_batch_size=10 is not divisible by the 4"),
    (["meta.u_mode=unrolled", "deepspeed_teacher=ds_configs/zero3.json"], 1, r"meta.u_mode=unrolled .* torch"),
    (["meta.schedule=fast", "deepspeed_student=ds_configs/zero2.json"], 1, r"meta.schedule=fast"),
])
def test_what_cannot_run_distributed_is_refused_before_any_work(overrides, world, match):
    with pytest.raises(ConfigError, match=match):
        check_distributed(load_config(None, overrides), world)
    check_distributed(Config(), 1)


def test_rank_slices_make_up_the_global_batch():
    rows = worker.Rows(40, seed=3)
    whole = BatchStream(rows, 8, 0, lambda ids: ids, None)
    for step in range(6):  # across an epoch boundary
        ranks = [BatchStream(rows, 8, 0, lambda ids: ids, 2, rank, 2)(step) for rank in range(2)]
        assert all(len(micro) == 2 for parts in ranks for micro in parts)
        assert [i for parts in ranks for micro in parts for i in micro] == whole(step)[0]


def test_deepspeed_launcher_rank_argument_is_stripped(monkeypatch):
    from metadistil_scale.launch.deepspeed_train import strip_local_rank

    # strip_local_rank exports LOCAL_RANK, as under the launcher. setenv records its absence, so the export is
    # undone after the test (delenv of an absent variable records nothing); transformers' Trainer reads it.
    monkeypatch.setenv("LOCAL_RANK", "")
    monkeypatch.delenv("LOCAL_RANK")
    assert strip_local_rank(["--local_rank=1", "train", "--resume"]) == ["train", "--resume"]
    assert os.environ["LOCAL_RANK"] == "1"
    assert strip_local_rank(["train", "--local-rank", "1"]) == ["train"]
