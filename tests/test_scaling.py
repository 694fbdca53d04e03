"""The scaling tools without training: sweep files and their validation, point status,
the CSV row of a run directory, the report's arithmetic, plots and TensorBoard hparams,
and the estimator's memory / communication / calibration arithmetic against hand counts
and DeepSpeed's own model-state estimators.

    python -m pytest -q tests/test_scaling.py
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from launcher.cli import _preflight_check
from launcher.cli import main as cli_main
from scaling import estimate as est
from scaling.calibrate import calibrate, parse_bandwidth
from scaling.collect import COLUMNS, point_row, read_results_csv
from scaling.report import efficiency, pareto, scaling_kind, write_report
from scaling.shape import shape_for, shape_of
from scaling.sweep import classify, load_sweep, point_name, validate
from trainer.config import ConfigError, load_config

from conftest import ROOT

DEMO_SWEEP = ROOT / "configs" / "sweeps" / "demo.yaml"


def _sweep_file(tmp_path: Path, **content) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


# ---- sweep files --------------------------------------------------------------------------
def test_demo_sweep_expands_to_named_points_with_overrides():
    sweep = load_sweep(DEMO_SWEEP)
    names = [p.name for p in sweep.points]
    assert names == [f"nproc{n}-zero{z}" for n in (1, 2) for z in (0, 2, 3)]
    p = sweep.points[-1]
    assert p.nproc == 2 and p.nodes == 1
    assert "zero.stage=3" in p.overrides and "train.max_steps=30" in p.overrides
    cfg = load_config(sweep.base, p.overrides)
    assert cfg.zero.stage == 3 and cfg.launch.nproc_per_node == 2 and cfg.train.max_steps == 30


def test_point_names_are_stable_and_readable():
    assert point_name({"launch.nproc_per_node": 2, "zero.stage": 3}) == "nproc2-zero3"
    assert point_name({"precision": "bf16", "zero.offload_optimizer": True}) == "bf16-offload"
    assert point_name({"train.lr": 0.001, "nodes": 4}) == "lr0.001-nodes4"
    assert point_name({}) == "base"


@pytest.mark.parametrize(
    "content, expected",
    [
        ({"grid": {"zero.stage": 2}}, "grid key zero.stage must list its values"),
        ({"grid": {"zero.stage": []}}, "grid key zero.stage must list its values"),
        ({"gird": {}}, "unknown key(s) ['gird']"),
        ({"timeout_s": -1}, "timeout_s=-1"),
        ({"slurm": {"nodes": 2}}, "slurm must be a mapping with keys"),
        ({"grid": {"train.lr": [1e-3, 0.001]}}, "same point name twice"),
    ],
)
def test_bad_sweep_files_are_named(tmp_path, content, expected):
    with pytest.raises(ConfigError) as e:
        load_sweep(_sweep_file(tmp_path, base="configs/demo.yaml", **content))
    assert expected in str(e.value)


def test_every_point_is_validated_before_any_run(tmp_path):
    """A bad value in the last point stops the sweep before the first: named point and key."""
    path = _sweep_file(
        tmp_path,
        base=str(ROOT / "configs" / "demo.yaml"),
        grid={"launch.nproc_per_node": [1, 2], "zero.stage": [2, 7]},
    )
    sweep = load_sweep(path)
    with pytest.raises(ConfigError) as e:
        validate(sweep, _preflight_check, slurm=False)
    msg = str(e.value)
    assert "sweep point nproc1-zero7" in msg and "zero.stage" in msg and "7" in msg


def test_unknown_key_and_bad_batch_name_their_point(tmp_path):
    base = str(ROOT / "configs" / "demo.yaml")
    sweep = load_sweep(_sweep_file(tmp_path, base=base, grid={"train.micro_batchsize": [8]}))
    with pytest.raises(ConfigError, match=r"sweep point micro-batchsize8 .*train\.micro_batchsize"):
        validate(sweep, _preflight_check, slurm=False)
    # demo: global 64; micro 48 × world 2 does not divide it
    sweep = load_sweep(
        _sweep_file(
            tmp_path,
            base=base,
            grid={"launch.nproc_per_node": [2], "train.micro_batch_size": [16, 48]},
        )
    )
    with pytest.raises(ConfigError, match=r"sweep point nproc2-micro48 "):
        validate(sweep, _preflight_check, slurm=False)


def test_nodes_need_slurm(tmp_path):
    sweep = load_sweep(
        _sweep_file(tmp_path, base=str(ROOT / "configs" / "demo.yaml"), grid={"nodes": [1, 2]})
    )
    with pytest.raises(ConfigError, match=r"sweep point nodes2 .*nodes=2 needs --slurm"):
        validate(sweep, _preflight_check, slurm=False)


def test_sweep_cli_bad_point_exits_2_and_writes_nothing(tmp_path, capsys):
    path = _sweep_file(
        tmp_path, base=str(ROOT / "configs" / "demo.yaml"), grid={"precision": ["fp32", "fp64"]}
    )
    out = tmp_path / "out"
    assert cli_main(["sweep", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep point fp64" in err and "precision" in err
    assert not out.exists()


def test_dry_run_lists_points_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    assert cli_main(["sweep", str(DEMO_SWEEP), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "sweep [6/6] nproc2-zero3: 1 node(s) × 2 rank(s)" in text and not out.exists()


@pytest.mark.parametrize(
    "code, output, timed_out, status, reason",
    [
        (0, "", False, "done", ""),
        (1, "", True, "timeout", "timeout_s"),
        (124, "", False, "timeout", "exit 124"),
        (
            1,
            "[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to",
            False,
            "oom",
            "CUDA out of memory",
        ),
        (-9, "training...", False, "oom", "OOM killer"),
        (
            1,
            "[rank1]: ValueError: bad thing\nzerotune: rank 1 exited with code 1; its error is above",
            False,
            "failed",
            "exit 1: ValueError: bad thing",
        ),
    ],
)
def test_classify_point_status(code, output, timed_out, status, reason):
    got_status, got_reason = classify(code, output, timed_out)
    assert got_status == status and reason in got_reason


# ---- one point's row ------------------------------------------------------------------------
def _fake_run(d: Path, world: int, stage: int, tokens_per_s: float, step: float, **extra) -> Path:
    """A run directory as the trainer writes it (results/env/config/metrics)."""
    d.mkdir(parents=True)
    cfg = load_config(None, [f"zero.stage={stage}"])
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    (d / "env.json").write_text(
        json.dumps(
            {
                "world_size": world,
                "hosts": ["a"] * world,
                "batch": {"micro": 32, "grad_accum": 64 // (32 * world), "global": 64},
                "device_name": "x86_64",
                "parameters": 304898,
                "total_steps": 30,
            }
        )
    )
    tp = {"tokens_per_s": tokens_per_s, "samples_per_s": 64 / step, "step_time_s": step}
    tp.update(extra.pop("throughput", {}))
    results = {"world_size": world, "steps": 30, "total_steps": 30, "throughput": tp, **extra}
    (d / "results.json").write_text(json.dumps(results))
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(5, 31, 5):
            f.write(
                json.dumps(
                    {"step": s, "kind": "train", "step_time_s": step, "tokens_per_s": tokens_per_s}
                )
                + "\n"
            )
    return d


def test_point_row_reads_the_runs_own_figures(tmp_path):
    d = _fake_run(
        tmp_path / "nproc2-zero3",
        2,
        3,
        5000.0,
        0.2,
        throughput={"mfu": 0.01, "tflops_per_device": 0.002},
        memory={
            "peak_memory_bytes": 123,
            "model_states_bytes_measured": 45,
            "model_states_bytes_predicted": 44,
        },
        cost={"cost_per_1m_tokens": 0.5, "price_per_device_hour": 0.09},
    )
    row = point_row(d, {"launch.nproc_per_node": 2})
    assert set(COLUMNS) <= set(row)
    assert row["world_size"] == 2 and row["zero_stage"] == 3 and row["grad_accum"] == 1
    assert row["tokens_per_s"] == 5000.0 and row["mfu"] == 0.01 and row["peak_memory_bytes"] == 123
    assert row["model_states_bytes_measured"] == 45 and row["cost_per_1m_tokens"] == 0.5
    assert row["device_hours_per_1m_tokens"] == pytest.approx(2 * 1e6 / 5000 / 3600)
    assert row["status"] == "done"  # no sweep_status.json: a finished run is done


def test_point_row_falls_back_to_metrics_window(tmp_path):
    d = _fake_run(tmp_path / "p", 1, 2, 7000.0, 0.1)
    results = json.loads((d / "results.json").read_text())
    results["throughput"] = {"mean_step_time_s": 0.1, "warmup_steps_excluded": 2}
    (d / "results.json").write_text(json.dumps(results))
    row = point_row(d)
    assert row["tokens_per_s"] == 7000.0 and row["step_time_s"] == 0.1


# ---- report -------------------------------------------------------------------------------
def test_pareto_front_is_the_undominated_points():
    pts = [(1.0, 5.0), (2.0, 3.0), (2.5, 4.0), (3.0, 1.0), (4.0, 1.0), (0.5, 9.0)]
    assert sorted(pareto(pts)) == [0, 1, 3, 5]


def test_scaling_efficiency_and_kind():
    strong = [
        {"world_size": 1, "global_batch_size": 64, "tokens_per_s": 1000.0},
        {"world_size": 2, "global_batch_size": 64, "tokens_per_s": 1500.0},
        {"world_size": 4, "global_batch_size": 64, "tokens_per_s": 2000.0},
    ]
    assert scaling_kind(strong) == "strong"
    assert efficiency(strong) == pytest.approx([1.0, 0.75, 0.5])
    weak = [dict(p, global_batch_size=16 * p["world_size"]) for p in strong]
    assert scaling_kind(weak) == "weak"


def test_report_plots_csv_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from scaling.collect import write_results_csv
    from scaling.sweep import load_sweep

    out = tmp_path / "sweep"
    figures = {(1, 0): 4000.0, (2, 0): 6000.0, (1, 3): 2000.0, (2, 3): 3000.0}
    for (world, stage), tps in figures.items():
        _fake_run(
            out / f"nproc{world}-zero{stage}",
            world,
            stage,
            tps,
            64 * 20 / tps,
            memory={
                "peak_memory_bytes": 2**29,
                "model_states_bytes_measured": 2**22,
                "model_states_bytes_predicted": 2**22,
            },
        )
    sweep = load_sweep(
        _sweep_file(
            tmp_path,
            base="configs/demo.yaml",
            grid={"launch.nproc_per_node": [1, 2], "zero.stage": [0, 3]},
        )
    )
    write_results_csv(out, sweep)
    (out / "sweep.json").write_text(
        json.dumps({"base": "configs/demo.yaml", "grid_keys": sweep.grid_keys})
    )
    report = write_report(out)
    for png in (
        "throughput_vs_world_size",
        "scaling_efficiency",
        "memory_by_zero_stage",
        "time_vs_cost",
    ):
        data = (out / f"{png}.png").read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, png
        assert f"({png}.png)" in report.read_text()
    text = report.read_text()
    assert "stage=0 — strong scaling efficiency vs 1 rank(s): 1 ranks 1.00, 2 ranks 0.75" in text
    rows = read_results_csv(out / "results.csv")
    assert [r["tokens_per_s"] for r in rows] == [4000.0, 2000.0, 6000.0, 3000.0]
    # TensorBoard's own reader sees one hparams session per point with its values
    ea = EventAccumulator(str(out / "tensorboard" / "nproc2-zero3"))
    ea.Reload()
    content = ea.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hp = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hp["world_size"].number_value == 2 and hp["zero.stage"].number_value == 3
    assert ea.Scalars("sweep/tokens_per_s")[0].value == pytest.approx(3000.0)
    with open(out / "results.csv") as f:
        assert "cost_per_1m_tokens" in next(csv.reader(f))


# ---- estimate -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama7b():
    from transformers import LlamaConfig

    return shape_of(LlamaConfig(), "causal_lm")  # Llama-2-7B's shape: the defaults


def test_llama7b_shape_is_counted_on_meta(llama7b):
    assert llama7b.parameters == 6_738_415_616 and llama7b.trainable == llama7b.parameters
    assert (llama7b.layers, llama7b.hidden, llama7b.vocab) == (32, 4096, 32000)


def test_demo_shape_matches_the_trainer():
    shape = shape_for(load_config(None))
    assert shape.parameters == 304_898  # results.json["parameters"] of a demo run


def test_communication_volumes_by_stage(llama7b):
    P, n = llama7b.parameters, 8
    f = (n - 1) / n
    assert est.comm_bytes(llama7b, "bf16", 0, n, 4, "deepspeed") == pytest.approx(2 * f * P * 2)
    assert est.comm_bytes(llama7b, "bf16", 1, n, 4, "deepspeed") == pytest.approx(f * P * 4)
    assert est.comm_bytes(llama7b, "bf16", 2, n, 4, "deepspeed") == pytest.approx(
        4 * f * P * 2 + f * P * 2
    )
    assert est.comm_bytes(llama7b, "bf16", 3, n, 4, "deepspeed") == pytest.approx(4 * f * P * 6)
    assert est.comm_bytes(llama7b, "fp32", 0, n, 1, "ddp") == pytest.approx(2 * f * P * 4)
    assert est.comm_bytes(llama7b, "bf16", 3, 1, 4, "deepspeed") == 0.0


def test_activations_follow_korthikanti(llama7b):
    """bf16, no recompute, scores kept (eager): 34·s·b·h + 5·a·s²·b per layer."""
    s, b, h, a, L, V = 2048, 2, 4096, 32, 32, 32000
    full, ckpt = est.activation_bytes(llama7b, b, s, "bf16", attention="eager")
    hand = L * (s * b * h * 34 + 5 * a * s * s * b) + b * s * V * (2 + 4) + s * b * h * 2
    assert full == pytest.approx(hand)
    sdpa, _ = est.activation_bytes(llama7b, b, s, "bf16")
    assert sdpa == pytest.approx(hand - L * 5 * a * s * s * b)
    one_layer = s * b * h * 34 + 5 * a * s * s * b  # the block being recomputed
    assert ckpt == pytest.approx(L * 2 * s * b * h + one_layer + b * s * V * 6 + s * b * h * 2)


def test_model_states_beside_deepspeeds_estimators(llama7b):
    """bf16 per GPU against DeepSpeed's estimate_zero2/3_model_states_mem_needs: they differ
    by exactly the terms DeepSpeed's generic arithmetic has and a zerotune run does not."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = load_config(None, ["precision=bf16"])
    P = llama7b.parameters
    largest = llama7b.vocab * llama7b.hidden  # the embedding
    for world in (8, 64, 512):
        nodes = world // 8
        ours2 = est.model_states(llama7b, cfg, 2, world, 1).total
        _, ds2 = estimate_zero2_model_states_mem_needs(P, 8, nodes, False)
        # DeepSpeed's 18 B/param/n counts a 16-bit gradient partition beside the fp32 one;
        # with fp32 accumulation (zerotune's bf16 ZeRO-2) only the fp32 partition exists
        assert ds2 - ours2 == pytest.approx(2 * P / world, rel=1e-6), world
        ours3 = est.model_states(llama7b, cfg, 3, world, 1).total
        _, ds3, _ = estimate_zero3_model_states_mem_needs(P, largest, 8, nodes, False, False)
        # DeepSpeed adds 4 B × the largest layer; zerotune the persistent small parameters
        persistent = 2 * llama7b.persistent_params
        assert ds3 - 4 * largest - (ours3 - persistent) == pytest.approx(0, abs=world + 64), world


def test_fit_and_step_time_of_llama7b_on_h100(llama7b):
    cfg = load_config(
        None,
        [
            "precision=bf16",
            "data.max_length=2048",
            "train.micro_batch_size=1",
            "train.global_batch_size=512",
            "task=causal_lm",
            "data.train=builtin:echo",
        ],
    )
    hw = est.device_hardware("H100", "bf16")
    cal = est.Calibration()
    p0 = est.estimate_point(llama7b, cfg, hw, cal, 8, 0)
    p3 = est.estimate_point(llama7b, cfg, hw, cal, 512, 3)
    assert not p0.fits  # 16 B/param = 108 GB of model states on each of 8 GPUs
    assert p3.fits and p3.model_states_bytes < 1 * 2**30
    # compute: 6N·tokens / (peak·eff) per rank; 8 ranks × accum 64
    fpt = est.flops.flops_per_token(llama7b.config, 2048, 1.0, lm_head=True)
    assert p0.compute_s == pytest.approx(fpt * 2048 * 512 / 8 / (989.4e12 * 0.4))
    assert p0.comm_s == pytest.approx(2 * 7 / 8 * llama7b.parameters * 2 / 450e9)
    assert p3.comm_s > p0.comm_s  # 64 accumulation micro-steps of gathers and reduce-scatters
    assert p0.mfu == pytest.approx(0.4 * p0.compute_s / p0.step_time_s)
    assert p0.cost_per_1m_tokens == pytest.approx(2.99 * 8 * 1e6 / p0.tokens_per_s / 3600)


def test_calibration_round_trip(tmp_path, monkeypatch):
    """A run whose step time the model predicts at efficiency 0.123 calibrates back to it,
    with the run's own CPU probe (per thread) as the peak, not this process's."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # torchrun's thread rule
    cfg = load_config(None)
    shape = shape_for(cfg)
    hw = est.device_hardware("cpu", "fp32", bandwidth=2.0)
    hw.peak_tflops = 0.05 * hw.cores  # 0.05 TFLOP/s per thread
    truth = est.estimate_point(shape, cfg, hw, est.Calibration(0.123, 20.0), 2, 2)
    assert truth.comm_s > 0 and truth.compute_s > 0
    d = _fake_run(
        tmp_path / "run",
        2,
        2,
        20.0 * 64 / truth.step_time_s,
        truth.step_time_s,
        throughput={"peak_tflops": est.device_peak(hw, 2)},  # a rank of 2: one thread
    )
    hw2 = est.device_hardware("cpu", "fp32", bandwidth=2.0)
    cal, _ = calibrate(d, shape, hw2)
    assert cal.efficiency == pytest.approx(0.123, rel=1e-6)
    assert cal.tokens_per_sample == pytest.approx(20.0)
    assert hw2.peak_tflops == pytest.approx(0.05 * hw.cores)
    # one rank alone gets every core: compute time divides by the cores, communication is gone
    one = est.estimate_point(shape, cfg, hw2, cal, 1, 2)
    assert one.comm_s == 0 and one.compute_s == pytest.approx(truth.compute_s * 2 / hw.cores)


def test_bandwidth_from_doctor_output(tmp_path):
    doc = tmp_path / "doctor.txt"
    doc.write_text(
        "launcher torchrun, world 2\nall-reduce 32.0 MB: 21.50 ms, algbw 1.49 GB/s, busbw 1.49 GB/s\ndoctor: all checks passed\n"
    )
    assert parse_bandwidth(str(doc))[0] == 1.49
    assert parse_bandwidth("45")[0] == 45.0
    with pytest.raises(ConfigError, match="--bandwidth 'nope'"):
        parse_bandwidth("nope")


def test_estimate_cli_json_and_bad_input(capsys):
    assert (
        cli_main(
            ["estimate", "--world-sizes", "1,2,4", "--zero", "0,3", "--gpu", "A100 80GB", "--json"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert len(out["points"]) == 6 and out["hardware"]["name"] == "A100 80GB"
    for p in out["points"]:
        if p["feasible"]:
            for key in ("step_time_s", "tokens_per_s", "mfu", "cost_per_1m_tokens", "device_bytes"):
                assert math.isfinite(p[key]) and p[key] > 0, key
    for argv, expected in [
        (["--gpu", "X99"], "--gpu 'X99': unknown device"),
        (["--world-sizes", "1,two"], "--world-sizes '1,two'"),
        (["--zero", "0,5"], "--zero '0,5'"),
        (["--calibrate", "/nonexistent/run"], "not a run directory"),
    ]:
        assert cli_main(["estimate", *argv]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
