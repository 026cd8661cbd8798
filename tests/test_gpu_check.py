"""scripts/gpu_check.sh and benchmarks/gpu_check.py on CPU: everything but the GPU work itself.

The no-CUDA exit, each part's skip logic, the time limit, the report writer, the run comparison, the kernel
check's harness (under the Triton interpreter) and the LM step on a tiny model, so that a first GPU run can
fail only for GPU reasons.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check as gc  # noqa: E402
import gpu_kernels as gk  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the Triton interpreter's -inf arithmetic

HAS_GPU = gc.detect_cuda()[0]


# ---------------------------------------------------------------- no CUDA: one line, exit 2, at once


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: the command would run the whole check")
def test_without_cuda_the_command_exits_2_with_one_line_in_seconds():
    before = sorted(gc.RESULTS_DIR.iterdir()) if gc.RESULTS_DIR.is_dir() else []
    start = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == gc.NO_CUDA_EXIT == 2
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no CUDA GPU here"), lines
    assert elapsed < 5.0, f"{elapsed:.1f} s"
    assert (sorted(gc.RESULTS_DIR.iterdir()) if gc.RESULTS_DIR.is_dir() else []) == before  # nothing written


def test_detect_cuda_without_nvidia_smi_falls_back_to_the_driver(tmp_path):
    missing = "no-such-nvidia-smi-command"
    found, why = gc.detect_cuda(nvidia_smi=missing, proc_gpus=tmp_path / "gpus")
    assert not found and missing in why and "no NVIDIA driver" in why
    (tmp_path / "gpus" / "0000:01:00.0").mkdir(parents=True)
    found, why = gc.detect_cuda(nvidia_smi=missing, proc_gpus=tmp_path / "gpus")
    assert found and "1 GPU(s)" in why
    # an nvidia-smi that fails (here `false`) means no usable GPU, whatever /proc says
    found, why = gc.detect_cuda(nvidia_smi="false", proc_gpus=tmp_path / "gpus")
    assert not found and "false -L exited 1" in why


# ---------------------------------------------------------------- parts: skip logic, limits, outcomes


def part(name: str, limit_s: int = 30) -> gc.Part:
    return gc.Part(name, f"the {name} part", limit_s)


def test_every_part_needs_a_passed_install(tmp_path):
    python = tmp_path / "python"
    python.touch()
    kernels = part("kernels")
    assert gc.skip_reason(part("install"), {}, tmp_path / "absent") is None
    assert gc.skip_reason(kernels, {}, python) == "the install part did not run"
    failed = {"install": {"status": "failed", "summary": "torch 2.13.0+cpu is a CPU build"}}
    assert gc.skip_reason(kernels, failed, python) == "install failed"
    passed = {"install": {"status": "passed", "summary": "ok"}}
    assert gc.skip_reason(kernels, passed, tmp_path / "absent").startswith("no virtualenv Python")
    assert gc.skip_reason(kernels, passed, python) is None


def test_part_outcome_status():
    p = part("kernels")
    assert gc.part_outcome(p, 0, 1.0, {"ok": True, "summary": "all good"}, "")["status"] == "passed"
    assert gc.part_outcome(p, 1, 1.0, {"ok": False, "summary": "2 failed"}, "")["status"] == "failed"
    assert gc.part_outcome(p, 0, 1.0, {"ok": False, "summary": "x"}, "")["status"] == "failed"
    crashed = gc.part_outcome(p, 1, 1.0, None, "Traceback ...\nImportError: no module named triton\n")
    assert crashed["status"] == "error" and crashed["summary"] == "ImportError: no module named triton"
    late = gc.part_outcome(p, None, 30.2, {"ok": False, "summary": "3/9 checks passed (incomplete)"}, "")
    assert late["status"] == "timeout" and late["summary"].startswith("stopped at its 30 s limit; 3/9")


def _writes(name: str, ok: bool, rc: int, out: Path) -> list[str]:
    code = f"import json, sys; json.dump({{'ok': {ok}, 'summary': '{name} said so'}}, open(sys.argv[1], 'w')); " \
           f"sys.exit({rc})"
    return [sys.executable, "-c", code, str(out / f"{name}.json")]


def test_a_failing_part_does_not_stop_the_next(tmp_path):
    python = tmp_path / "python"
    python.touch()
    parts = [part("install"), part("kernels"), part("bench"), part("lm")]
    commands = {"install": _writes("install", True, 0, tmp_path), "kernels": _writes("kernels", False, 1, tmp_path),
                "bench": [sys.executable, "-c", "raise SystemExit('bench crashed')"],
                "lm": _writes("lm", True, 0, tmp_path)}
    lines = []
    outcomes = gc.run_parts(parts, lambda p: commands[p.name], tmp_path, dict(os.environ), python,
                            {"install", "kernels", "bench", "lm"}, echo=lines.append)
    assert [(o["name"], o["status"]) for o in outcomes] == [
        ("install", "passed"), ("kernels", "failed"), ("bench", "error"), ("lm", "passed")]
    assert outcomes[2]["summary"] == "bench crashed"
    assert (tmp_path / "bench.log").read_text().strip() == "bench crashed"
    assert any(line.startswith("[gpu_check] kernels: failed") for line in lines)

    outcomes = gc.run_parts(parts, lambda p: commands[p.name], tmp_path, dict(os.environ), python, {"install", "lm"},
                            echo=lines.append)
    assert [o["status"] for o in outcomes] == ["passed", "skipped", "skipped", "passed"]
    commands["install"] = _writes("install", False, 1, tmp_path)
    outcomes = gc.run_parts(parts, lambda p: commands[p.name], tmp_path, dict(os.environ), python,
                            {"install", "kernels", "bench", "lm"}, echo=lines.append)
    assert [o["status"] for o in outcomes] == ["failed", "skipped", "skipped", "skipped"]
    assert outcomes[1]["summary"] == "install failed" and outcomes[0]["summary"] == "install said so"


def test_a_part_is_stopped_at_its_limit_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; wait"
    start = time.monotonic()
    outcome = gc.run_part(part("slow", limit_s=2), ["bash", "-c", script], tmp_path, dict(os.environ))
    assert outcome["status"] == "timeout" and outcome["rc"] is None
    assert time.monotonic() - start < 20
    child = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    time.sleep(0.2)
    # the launcher's child went with it (at most a zombie left for init to reap)
    assert not child.exists() or child.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_part_commands_and_environment(tmp_path):
    python = Path("/venv/bin/python")
    install = gc.part_command(gc.PARTS[0], python, tmp_path, bootstrap=True)
    assert install[:3] == ["bash", "-c", 'bash scripts/bootstrap.sh && exec "$@"']
    assert install[4:8] == [str(python), "benchmarks/gpu_check.py", "part", "install"]
    assert gc.part_command(gc.PARTS[0], python, tmp_path, bootstrap=False)[0] == str(python)
    env = gc.part_env({"TRITON_INTERPRET": "1", "DS_ACCELERATOR": "cpu", "PATH": "/bin"})
    assert "TRITON_INTERPRET" not in env and "DS_ACCELERATOR" not in env and env["PATH"] == "/bin"
    assert [p.name for p in gc.PARTS] == ["install", "kernels", "bench", "train", "lm"]
    assert sum(p.limit_s for p in gc.PARTS[1:]) < gc.CHECKS_BUDGET_S == 480  # under 8 minutes of checks


def test_install_result_says_what_is_wrong():
    info = {"python": "3.11.7", "torch": "2.13.0+cpu", "torch_cuda": None, "cuda_available": False,
            "triton": "3.9.0", "deepspeed": "0.19.8", "transformers": "5.0"}
    result = gc.install_result(info)
    assert not result["ok"] and "CPU build" in result["summary"] and "VENV=.venv-gpu" in result["summary"]
    good = dict(info, torch="2.13.0+cu128", torch_cuda="12.8", cuda_available=True, device="NVIDIA H200, sm_90, 140 GiB")
    assert gc.install_result(good)["ok"]
    broken = gc.install_result(dict(good, deepspeed=None, deepspeed_error="ImportError: libcudart"))
    assert not broken["ok"] and "cannot import deepspeed: ImportError: libcudart" in broken["summary"]


# ---------------------------------------------------------------- the train part's runs and comparison


def test_train_commands_parse_as_the_cli_and_the_launcher_will(tmp_path, monkeypatch):
    from metadistil_scale.launch.deepspeed_train import strip_local_rank

    # strip_local_rank exports LOCAL_RANK, as under the launcher. setenv records its absence, so the export is
    # undone after the test (delenv of an absent variable records nothing); transformers' Trainer reads it.
    monkeypatch.setenv("LOCAL_RANK", "")
    monkeypatch.delenv("LOCAL_RANK")

    from metadistil_scale.cli import build_parser, config_from_args

    cmds = gc.train_commands("/venv/bin/python", tmp_path / "ds", tmp_path / "one", 29511)
    launcher, one = cmds["deepspeed"], cmds["one_process"]
    assert launcher[1:7] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", "29511"]
    entry = launcher[launcher.index("metadistil_scale.launch.deepspeed_train") + 1:]
    assert entry[:-1] == one[3:-1]  # the same job, only the output folder differs
    cfg = config_from_args(build_parser().parse_args(strip_local_rank([*entry, "--local_rank=0"])))
    assert cfg.student_train.max_steps == cfg.teacher_finetune.max_steps == gc.TRAIN_STEPS == 20
    assert cfg.deepspeed_teacher == "ds_configs/zero3_bf16.json" and cfg.device == "cuda"
    assert json.loads((REPO / cfg.deepspeed_teacher).read_text())["zero_optimization"]["stage"] == 3
    assert json.loads((REPO / cfg.deepspeed_teacher).read_text())["bf16"]["enabled"] is True
    assert cfg.output_dir == str(tmp_path / "ds")


def _fake_run(folder: Path, losses: dict[str, list[float]], tests: dict[str, float]) -> Path:
    """A run folder in the trainer's layout (results.json, <stage>/metrics.jsonl, checkpoints)."""
    rows = [{"model": "teacher" if stage == "teacher" else "student",
             "method": "finetune" if stage == "teacher" else stage, "steps": 20, "best_dev": tests[stage] - 0.01,
             "best_step": 20, "test": {"accuracy": tests[stage], "f1": 0.5}, "wall_time_s": 3.0}
            for stage in losses]  # fmt: skip
    (folder / "kd" / "best").mkdir(parents=True)
    (folder / "kd" / "best" / "model.safetensors").write_bytes(b"weights")
    (folder / "results.json").write_text(json.dumps({"task": "rotten_tomatoes", "metric": "accuracy", "seed": 0,
                                                     "rows": rows, "wall_time_s": 9.0}))
    for stage, values in losses.items():
        (folder / stage).mkdir(exist_ok=True)
        records = [{"step": 10 * (i + 1), "loss": v, "lr": 1e-4} for i, v in enumerate(values)]
        (folder / stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_compare_runs_figure_by_figure(tmp_path):
    losses = {"teacher": [0.69, 0.52], "kd": [1.10, 0.90], "metadistil": [1.20, 0.95]}
    tests = {"teacher": 0.80, "kd": 0.74, "metadistil": 0.75}
    a = _fake_run(tmp_path / "a", losses, tests)
    rows = gc.compare_runs(a, _fake_run(tmp_path / "b", {k: [v * 1.01 for v in vs] for k, vs in losses.items()},
                                        {k: v + 0.01 for k, v in tests.items()}))
    assert len(rows) == 3 * 2 + 3 * 2 and all(r["ok"] for r in rows)  # test + best dev, two losses per stage

    off = _fake_run(tmp_path / "c", dict(losses, kd=[1.10, 0.95]), dict(tests, metadistil=0.70))
    bad = {r["what"] for r in gc.compare_runs(a, off) if not r["ok"]}
    assert bad == {"kd: loss at step 20", "student metadistil: test accuracy", "student metadistil: best dev accuracy"}
    short = _fake_run(tmp_path / "d", {"teacher": [0.69, 0.52], "kd": [1.10]}, tests)
    bad = {r["what"] for r in gc.compare_runs(a, short) if not r["ok"]}
    assert "kd: loss at step 20" in bad and "student metadistil: test accuracy" in bad
    assert gc.compare_runs(tmp_path / "nothing", tmp_path / "nothing") == []

    kept = tmp_path / "kept"
    gc.keep_run_files(a, kept)
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "kd/metrics.jsonl", "metadistil/metrics.jsonl", "results.json", "teacher/metrics.jsonl"]
    result = gc.train_result(a, kept, {"deepspeed": 0, "one_process": 0}, {"deepspeed": 50.0, "one_process": 40.0})
    assert result["ok"] and result["summary"].startswith("12/12 figures agree")
    assert "student test kd 0.74 / 0.74" in result["summary"]
    failed = gc.train_result(a, off, {"deepspeed": None, "one_process": 0}, {})
    assert not failed["ok"] and "deepspeed timed out" in failed["summary"]


@pytest.mark.slow
def test_compare_runs_reads_a_real_run(tmp_path):
    """The comparison on the trainer's own output (a tiny recipe on CPU), not only on a hand-made copy."""
    from test_deepspeed import _recipe

    from metadistil_scale import cli

    recipe = _recipe(tmp_path)
    assert cli.main(["train", "--config", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    rows = gc.compare_runs(tmp_path / "run", tmp_path / "run")
    assert rows and all(r["ok"] for r in rows)
    assert {"student metadistil: test accuracy", "metadistil: loss at step 2"} <= {r["what"] for r in rows}
    shutil.copytree(tmp_path / "run", tmp_path / "other")
    log = tmp_path / "other" / "metadistil" / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    records[-1]["loss"] *= 1.5
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [r["what"] for r in gc.compare_runs(tmp_path / "run", tmp_path / "other") if not r["ok"]] == [
        "metadistil: loss at step 2"]


# ---------------------------------------------------------------- the report


def _outcomes(tmp_path) -> list[dict]:
    checks = [{"check": "kd_loss", "n": 8192, "v": 128256, "dtype": "bfloat16", "soft_loss": "kl", "reduction": "mean",
               "loss_err": 1e-6, "grad_err": 2e-3, "loss_tol": 1e-4, "grad_tol": 4e-3, "ok": True},
              {"check": "meta_cotangent", "n": 11, "v": 100, "dtype": "float32", "soft_loss": "mse", "err": 3e-5,
               "tol": 1e-5, "ok": False},
              {"check": "finfo.min row", "ok": True, "detail": ""}]  # fmt: skip
    bench = [{"kind": "device", "name": "NVIDIA H200", "copy_gbs": 4000.0},
             {"kind": "kd_loss", "n": 8192, "v": 128256, "impl": "triton (fused)", "ms": 2.1, "peak_extra_gib": 2.0,
              "gbs": 3000.0, "fraction_of_copy": 0.75},
             {"kind": "kd_loss", "n": 8192, "v": 128256, "impl": "torch.compile", "error": "OutOfMemoryError: ..."},
             {"kind": "meta_cotangent", "n": 8192, "v": 128256, "impl": "eager", "ms": 9.0, "gbs": 700.0,
              "fraction_of_copy": 0.18}]  # fmt: skip
    lm = [{"vocab": 49152, "tokens": 4096, "path": "chunked", "dtype": "bfloat16", "step_s": 0.3, "peak_gib": 3.5,
           "step_added_gib": 1.2},
          {"vocab": 49152, "tokens": 4096, "path": "materialised", "dtype": "float32", "error": "OutOfMemoryError"}]
    a = _fake_run(tmp_path / "a", {"kd": [1.0, 0.9]}, {"kd": 0.7})
    results = {
        "install": gc.install_result({"python": "3.11", "torch": "2.13.0", "torch_cuda": "12.8", "cuda_available": True,
                                      "triton": "3.9", "deepspeed": "0.19", "transformers": "5",
                                      "device": "NVIDIA H200, sm_90, 140 GiB"}),
        "kernels": gc.kernels_result(checks, done=True),
        "bench": gc.bench_result(bench, done=False),
        "train": gc.train_result(a, a, {"deepspeed": 0, "one_process": 0}, {"deepspeed": 60, "one_process": 50}),
        "lm": gc.lm_result(lm, done=True),
    }
    return [gc.part_outcome(p, 0 if results[p.name]["ok"] else 1, 12.0, results[p.name], "") for p in gc.PARTS]


def test_part_results_summarise_what_matters(tmp_path):
    by = {o["name"]: o for o in _outcomes(tmp_path)}
    assert by["install"]["status"] == "passed" and "NVIDIA H200" in by["install"]["summary"]
    assert by["kernels"]["status"] == "failed"
    assert by["kernels"]["summary"].startswith("2/3 checks passed; worst gradient/cotangent error bfloat16 2.0e-03")
    assert "FAILED: meta_cotangent 11x100 float32 mse" in by["kernels"]["summary"]
    assert by["bench"]["status"] == "failed" and by["bench"]["summary"].endswith("(incomplete)")
    assert "triton (fused) 2.10 ms (0.75 of copy bw), torch.compile error" in by["bench"]["summary"]
    assert by["train"]["status"] == "passed"
    assert by["lm"]["status"] == "failed"
    assert "bf16 chunked 0.30 s / 3.5 GiB, fp32 materialised error" in by["lm"]["summary"]


def test_report_is_written_as_json_and_markdown_with_a_one_screen_summary(tmp_path):
    outcomes = _outcomes(tmp_path)
    machine = {"host": "gpu-1", "gpu": "NVIDIA H200, 570.1, 143771 MiB", "commit": "abc123", "changes": "clean"}
    report = gc.build_report("2026-01-01 00:00:00 UTC", machine, outcomes)
    json_path, md_path = gc.write_report(report, tmp_path / "report")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report))
    assert not report["passed"] and report["checks_limit_s"] == sum(p.limit_s for p in gc.PARTS[1:])
    md = md_path.read_text()
    assert md.startswith("# GPU acceptance check, 2026-01-01 00:00:00 UTC\n\nNVIDIA H200, 570.1, 143771 MiB")
    assert "Overall: **NOT passed**" in md
    for name in ("install", "kernels", "bench", "train", "lm"):
        assert f"\n| {name} | " in md and f"\n## {name}: " in md
    assert "| meta_cotangent 11x100 float32 mse | 3.0e-05 | 1e-05 | NO |" in md  # the failed check
    assert "| 8192 | 128256 | triton (fused) | 2.100 | 2.00 | 3000 | 0.75 |" in md  # the benchmark table
    assert "| student kd: test accuracy | 0.7 | 0.7 | abs 0.02 | yes |" in md
    assert "| bfloat16 | chunked | 49152 | 4096 | 0.300 | 3.50 | 1.20 |" in md

    lines = gc.summary_lines(report)
    assert len(lines) <= 12 and all(len(line) <= 110 for line in lines)
    assert lines[0].startswith("GPU check NOT PASSED: install 12 s, checks 48 s of 470 s")
    assert [line.split()[0] for line in lines[2:]] == ["install", "kernels", "bench", "train", "lm"]

    skipped = [gc.skipped(p, "not selected (--parts)") if p.name == "kernels" else o
               for p, o in zip(gc.PARTS, outcomes)]
    assert not gc.build_report("t", machine, skipped)["passed"]  # the others still fail
    passing = [o if o["name"] in ("install", "train") else gc.skipped(gc.PARTS[i], "not selected (--parts)")
               for i, o in enumerate(outcomes)]
    assert gc.build_report("t", machine, passing)["passed"]


# ---------------------------------------------------------------- benchmarks/gpu_kernels.py's harness on CPU


def test_kernel_check_harness_runs_under_the_interpreter():
    # fp32 and fp64 only: the interpreter's fp32 -> bf16 stores truncate where a GPU rounds to nearest.
    rows = []
    ok = gk.check_correctness([(11, 3), (5, 100)], rows.append, fp64_shapes=[(5, 100)], device="cpu",
                              dtypes=(torch.float32,))
    failed = [r for r in rows if not r["ok"]]
    assert ok and not failed, failed
    kd = [r for r in rows if r["check"] == "kd_loss"]
    assert {(r["n"], r["v"], r["dtype"], r["soft_loss"], r["reduction"]) for r in kd} == {
        (n, v, d, k, red) for n, v, d in ((11, 3, "float32"), (5, 100, "float32"), (5, 100, "float64"))
        for k in ("kl", "mse") for red in ("mean", "sum", "none")}
    assert max(r["grad_err"] for r in kd if r["dtype"] == "float64") <= 1e-12
    assert {r["check"] for r in rows} >= set(gk.EDGE_CASES)
    assert gc.kernels_result(rows, done=True)["ok"]


def test_reduced_reference_matches_the_reference_reductions():
    zs, zt, y = gk.make_inputs(6, 7, torch.float64, mask=True, device="cpu")
    for soft_loss in ("kl", "mse"):
        ref_loss, ref_grad = gk.reference_rows(zs, zt, y, soft_loss, rows_per_chunk=4)
        for reduction in ("mean", "sum", "none"):
            x = zs.clone().requires_grad_(True)
            loss = gk.kd_loss_reference(x, zt, y, temperature=gk.TEMPERATURE, alpha=gk.ALPHA, soft_loss=soft_loss,
                                        reduction=reduction)  # fmt: skip
            weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
            (loss * weights).sum().backward()
            exp_loss, exp_grad = gk.reduced_reference(ref_loss, ref_grad, y, reduction, weights)
            assert gk.rel_max_err(exp_loss, loss.detach()) < 1e-14
            assert gk.rel_max_err(exp_grad, x.grad) < 1e-14


def test_rel_max_err_and_shapes():
    ref = torch.tensor([1.0, -4.0, float("-inf")])
    assert gk.rel_max_err(torch.tensor([1.0, -4.0, float("-inf")]), ref) == 0.0
    assert gk.rel_max_err(torch.tensor([1.2, -4.0, float("-inf")]), ref) == pytest.approx(0.05)
    assert gk.rel_max_err(torch.tensor([1.0, float("nan"), float("-inf")]), ref) == float("inf")
    assert gk.rel_max_err(torch.tensor([1.0, -4.0, 0.0]), ref) == float("inf")
    assert gk.parse_shapes("4096x32000, 8192X128256") == [(4096, 32000), (8192, 128256)]
    with pytest.raises(ValueError, match="ROWSxVOCAB"):
        gk.parse_shapes("4096*32000")
    assert (8192, 128256) in gk.LARGE_SHAPES and gc.BENCH_SHAPES[-1] == (8192, 128256)


# ---------------------------------------------------------------- the LM part's step on a tiny model


def test_lm_step_measures_on_a_tiny_model():
    config = gc.smollm2_shaped_config(vocab=256, layers=2, hidden=64)
    assert gc.smollm2_shaped_config().to_dict()["vocab_size"] == gc.LM_VOCAB == 49152
    full = gc.smollm2_shaped_config()
    assert (full.hidden_size, full.intermediate_size, full.num_attention_heads, full.num_key_value_heads) == (
        576, 1536, 9, 3)  # SmolLM2-135M
    row = gc.measure_lm_step(config, 16, "materialised", "float32", "cpu", seq_len=8, timed_steps=1)
    assert row["teacher_layers"] == 2 and row["student_layers"] == 1 and row["step_s"] > 0
    assert gc.lm_result([row], done=True)["ok"]
