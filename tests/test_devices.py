"""Device binding, backend and accelerator rules as tables over environments (no GPU here).

Only what cannot run on this CPU machine is faked, and each test says what: the number of
visible GPUs (``visible_gpu_count``), a GPU's UUID (``gpu_uuid``) and a ``cuda:N`` device
object (never used for compute).
DeepSpeed's own code reads the exported variables wherever it can run on CPU: its engine's
``_configure_with_arguments`` (which asserts ``OMPI_COMM_WORLD_LOCAL_RANK == LOCAL_RANK``)
and its CUDA accelerator's ``device_name(LOCAL_RANK)``, the device ``zero.Init`` and the
engine bind to.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch
from multirank import free_port, run_distributed

from trainer import distributed, jobcheck
from trainer.config import ConfigError, load_config
from trainer.devices import (
    accelerator_warning,
    backend_for_device,
    backend_problem,
    config_wants_gpu,
    deepspeed_rank_vars,
    device_index,
    fp16_problem,
    job_device_check,
    requested_gpus,
    shared_gpu_problem,
    too_many_ranks_problem,
)
from trainer.env import detect_env

from conftest import TINY


@pytest.mark.parametrize(
    "local_rank, local_world, visible, expect",
    [
        (0, 1, 0, None),  # CPU
        (3, 8, 0, None),
        (3, 8, 8, 3),  # all GPUs visible per task: cuda:LOCAL_RANK
        (3, 4, 8, 3),  # fewer ranks than GPUs
        (0, 1, 1, 0),
        (1, 2, 1, 0),  # one GPU bound per task (--gpus-per-task=1): cuda:0, whatever the local rank
        (7, 8, 1, 0),
        (3, 4, 2, "sees 2 GPUs but 4 ranks"),  # 2 per task for 4 tasks: a modulo would share
        (5, 8, 4, "sees 4 GPUs but 8 ranks"),  # more ranks than GPUs: never cuda:(5 % 4)
        (4, 4, 4, "sees 4 GPUs but 5 ranks"),  # a local rank beyond the GPUs: no cuda:4
    ],
)
def test_device_index_table(local_rank, local_world, visible, expect):
    if isinstance(expect, str):
        with pytest.raises(ConfigError) as e:
            device_index(local_rank, local_world, visible)
        assert expect in str(e.value) and "one rank per GPU" in str(e.value)
    else:
        assert device_index(local_rank, local_world, visible) == expect


SLURM_TASK = {  # srun task 5 of 8, local 1 of 2 tasks on its node
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_NODEID": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[003-006]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
}
TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
MPIRUN = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    "MASTER_ADDR": "node1",
    "MASTER_PORT": "29400",
}


RANK_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "OMPI_COMM_WORLD_LOCAL_RANK",
)


@pytest.mark.parametrize(
    "environ, visible, device, exported",
    [
        (SLURM_TASK, 2, "cuda:1", {"LOCAL_RANK": "1"}),  # --gpus-per-node=2: both visible
        (SLURM_TASK, 1, "cuda:0", {"LOCAL_RANK": "0"}),  # --gpus-per-task=1: one bound per task
        (SLURM_TASK, 0, "cpu", {"LOCAL_RANK": "1"}),
        (TORCHRUN, 8, "cuda:1", {"LOCAL_RANK": "1"}),
        (TORCHRUN, 1, "cuda:0", {"LOCAL_RANK": "0"}),
        # mpirun with one GPU per rank: DeepSpeed asserts OMPI_..._LOCAL_RANK == LOCAL_RANK
        (MPIRUN, 1, "cuda:0", {"LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}),
        (MPIRUN, 2, "cuda:1", {"LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}),
    ],
    ids=[
        "srun-all-visible",
        "srun-one-per-task",
        "srun-cpu",
        "torchrun-all",
        "torchrun-one",
        "mpirun-one",
        "mpirun-all",
    ],
)
def test_rank_binds_the_device_deepspeed_reads(environ, visible, device, exported, monkeypatch):
    """Faked: the number of visible GPUs. Real: detect_env, the binding, the export, and
    DeepSpeed's engine and CUDA accelerator reading what was exported."""
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator
    from deepspeed.runtime.engine import DeepSpeedEngine

    for key in RANK_VARS:  # export_env writes these: setenv first so that monkeypatch restores
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(distributed, "visible_gpu_count", lambda: visible)
    env = detect_env(environ)
    dev = distributed.device_for(env)
    assert str(dev) == device
    distributed.export_env(env, dev)
    assert {k: os.environ[k] for k in exported} == exported
    assert os.environ["RANK"] == str(env.rank)
    # DeepSpeed's engine: LOCAL_RANK (asserting it equals OMPI_COMM_WORLD_LOCAL_RANK under mpirun)
    engine = types.SimpleNamespace()
    DeepSpeedEngine._configure_with_arguments(engine, None, None)
    if dev.type == "cuda":
        assert engine.local_rank == dev.index
        # the device set_device / zero.Init derive from it on a GPU machine
        assert CUDA_Accelerator().device_name(os.environ["LOCAL_RANK"]) == str(dev)
    else:
        assert engine.local_rank == env.local_rank


def test_modulo_sharing_is_refused_inside_the_rank(monkeypatch):
    """Faked: 2 visible GPUs for 4 ranks on the node (the old rule gave local rank 3 cuda:1)."""
    monkeypatch.setattr(distributed, "visible_gpu_count", lambda: 2)
    env = detect_env({**TORCHRUN, "LOCAL_RANK": "3", "RANK": "3", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="ranks would share GPUs"):
        distributed.device_for(env)


def _rec(rank, host, uuid, problem=None):
    return {
        "rank": rank,
        "host": host,
        "device": "cuda:0" if uuid else "cpu",
        "uuid": uuid,
        "problem": problem,
    }


@pytest.mark.parametrize(
    "records, expect",
    [
        ([_rec(0, "a", None), _rec(1, "a", None)], None),  # CPU ranks
        ([_rec(0, "a", "GPU-1"), _rec(1, "a", "GPU-2")], None),
        ([_rec(0, "a", "GPU-1"), _rec(1, "b", "GPU-1")], None),  # two hosts
        # srun --gpus-per-node=1 --ntasks-per-node=2: both tasks see "one GPU", the same one
        ([_rec(0, "a", "GPU-1"), _rec(1, "a", "GPU-1")], "ranks 0 and 1 share one GPU"),
        ([_rec(0, "a", "GPU-1"), _rec(1, "b", None)], "rank(s) [1] found no GPU"),
        # a rank's own problem (its device rule refused) reaches every rank, grouped by text
        (
            [
                _rec(0, "a", None, "sees 2 GPUs"),
                _rec(1, "a", "GPU-1"),
                _rec(2, "b", None, "sees 2 GPUs"),
            ],
            "rank(s) [0, 2] on a, b: sees 2 GPUs",
        ),
    ],
)
def test_shared_gpu_problem_table(records, expect):
    problem = shared_gpu_problem(records)
    assert problem is None if expect is None else expect in problem


def test_preflight_rule_for_ranks_started_together():
    assert too_many_ranks_problem(2, 2) is None
    assert too_many_ranks_problem(4, 0) is None  # CPU: as many ranks as asked
    assert "use at most 1" in too_many_ranks_problem(2, 1)  # one GPU, two ranks: shared


@pytest.mark.parametrize(
    "on_gpu, requested, expect",
    [
        (True, "auto", "nccl"),
        (False, "auto", "gloo"),
        (True, "nccl", "nccl"),
        (False, "gloo", "gloo"),
        (True, "gloo", "launch.backend='gloo' on GPU"),
        (False, "nccl", "launch.backend='nccl' without a GPU"),
    ],
)
def test_backend_follows_device(on_gpu, requested, expect):
    if expect.startswith("launch"):
        assert expect in backend_problem(requested, on_gpu)
        with pytest.raises(ConfigError, match="launch.backend"):
            backend_for_device(on_gpu, requested)
    else:
        assert backend_for_device(on_gpu, requested) == expect


def _init_with_faked_gpus(port: int, gpus: dict[int, str], slow_rank: int | None = None) -> dict:
    """``init_distributed`` on this rank, as ``trainer.main`` calls it, with a fresh rendezvous.
    Faked: rank r sees one GPU whose UUID is ``gpus[r]`` (``visible_gpu_count``, ``gpu_uuid``);
    the others see none. ``slow_rank`` reads the records 1.5 s after publishing its own."""
    import time

    import torch.distributed as dist

    if int(os.environ["RANK"]) == slow_rank:
        exchange = distributed.exchange_records

        def late(store, record, world_size, timeout):
            store.set(f"{distributed.DEVICE_KEY}{record['rank']}", json.dumps(record))
            time.sleep(1.5)  # the others have read everything by now
            return exchange(store, record, world_size, timeout)

        distributed.exchange_records = late

    # the harness's group: init_distributed makes its own. Both ranks meet first: gloo's
    # mesh connect is no barrier, and a rank that tore its group down at once closed the
    # pair a slower peer (a loaded machine) was still connecting ("Connection closed by peer")
    dist.barrier()
    dist.destroy_process_group()
    rank = int(os.environ["RANK"])
    os.environ["MASTER_PORT"] = str(port)
    distributed.visible_gpu_count = lambda: 1 if rank in gpus else 0
    distributed.gpu_uuid = lambda device: gpus[rank]
    try:
        env, device = distributed.init_distributed(detect_env(os.environ), timeout_minutes=1)
    except ConfigError as e:
        return {"error": str(e), "agreed": isinstance(e, distributed.AgreedConfigError)}
    try:
        group = distributed.long_group()
        return {
            "device": str(device),
            "backend": dist.get_backend(),
            "side_group": group is not None and group is not dist.group.WORLD,
            "side_backend": dist.get_backend(group),
            "gathered": distributed.all_gather_object(rank, long=True),
        }
    finally:
        distributed.destroy()


@pytest.mark.parametrize(
    "gpus, expect",
    [
        ({0: "GPU-a"}, "rank(s) [1] found no GPU while the others use one"),  # nccl vs gloo
        ({1: "GPU-a"}, "rank(s) [0] found no GPU while the others use one"),
        ({0: "GPU-a", 1: "GPU-a"}, "ranks 0 and 1 share one GPU"),  # one host, one GPU, two ranks
    ],
)
def test_ranks_that_disagree_on_the_device_stop_together(gpus, expect):
    """Two in-process ranks; the rule that made CPU ranks pick gloo and GPU ranks nccl made
    them wait for each other forever. The records now meet in the rendezvous store before any
    process group exists: both ranks raise the same AgreedConfigError within seconds."""
    out = run_distributed(_init_with_faked_gpus, 2, free_port(), gpus, timeout=60)
    assert [r.get("agreed") for r in out] == [True, True], out
    assert out[0]["error"] == out[1]["error"] and expect in out[0]["error"]


def test_the_store_host_waits_for_a_slow_rank_to_read_the_agreed_problem():
    """Rank 0 hosts the rendezvous store (env://): had it left as soon as it raised, rank 1,
    reading 1.5 s later, would find the store gone (a network error, not the message)."""
    gpus = {0: "GPU-a", 1: "GPU-a"}
    out = run_distributed(_init_with_faked_gpus, 2, free_port(), gpus, 1, timeout=60)
    assert [r.get("agreed") for r in out] == [True, True], out
    assert "ranks 0 and 1 share one GPU" in out[1]["error"]


def test_agreeing_ranks_get_a_gloo_side_group_whatever_the_backend():
    """Both ranks on CPU (gloo): the group forms, and the side group for long waits exists
    on gloo too (the same rule on every rank; gloo runs get its long timeout as well)."""
    out = run_distributed(_init_with_faked_gpus, 2, free_port(), {}, timeout=60)
    for r in out:
        assert (r["device"], r["backend"], r["side_backend"]) == ("cpu", "gloo", "gloo"), r
        assert r["side_group"] and r["gathered"] == [0, 1]


def test_fp16_without_a_gpu_is_one_rule_in_one_wording(tmp_path):
    """Pre-flight, the batch job's check and both engines say the same sentence."""
    from launcher.preflight import check
    from trainer.batch import BatchPlan
    from trainer.engine import DDPEngine

    message = fp16_problem("fp16", on_gpu=False)
    assert "precision='fp16' is not supported on this device (cpu)" in message and "bf16" in message
    assert fp16_problem("fp16", on_gpu=True) is None and fp16_problem("bf16", False) is None
    assert message in check(None, ["precision=fp16"], nproc=1, check_data=False).problems
    assert message in config_wants_gpu("fp16")
    cfg = load_config(None, ["precision=fp16", "engine=ddp", "zero.stage=0"])
    with pytest.raises(ConfigError) as e:
        DDPEngine(cfg, torch.nn.Linear(2, 2), BatchPlan(1, 1, 1), 1, torch.device("cpu"))
    assert str(e.value) == message


def test_doctor_and_train_spawn_through_one_torchrun_argv():
    from launcher.spawn import AGENT_SIGNALS, torchrun_args, trainer_args

    doctor = torchrun_args(
        2, "launcher", ["doctor", "--iters", "1"], signals_to_handle=AGENT_SIGNALS
    )
    train = torchrun_args(2, "trainer", trainer_args("c.yaml", ["a=1"], Path("r"), "auto"))
    assert doctor[doctor.index("--module") :] == ["--module", "launcher", "doctor", "--iters", "1"]
    assert train[train.index("--module") :] == [
        "--module", "trainer", "c.yaml", "--set", "a=1", "--run-dir", "r", "--resume", "auto",
    ]  # fmt: skip
    assert (
        doctor[: doctor.index("--signals-to-handle")] == train[: train.index("--signals-to-handle")]
    )
    assert "SIGTERM" in doctor[doctor.index("--signals-to-handle") + 1]
    assert "SIGTERM" not in train[train.index("--signals-to-handle") + 1]  # forwarded: checkpoint


@pytest.mark.parametrize(
    "environ, on_gpu, expect",
    [
        ({}, True, None),
        ({}, False, None),
        ({"DS_ACCELERATOR": "cuda"}, True, None),
        ({"DS_ACCELERATOR": "cpu"}, False, None),
        ({"DS_ACCELERATOR": "cpu"}, True, "DS_ACCELERATOR=cpu is set"),
        ({"DS_ACCELERATOR": "cuda"}, False, "DS_ACCELERATOR=cuda is set"),
    ],
)
def test_inherited_ds_accelerator_table(environ, on_gpu, expect):
    warning = accelerator_warning(environ, on_gpu)
    assert warning is None if expect is None else expect in warning and "unset" in warning


def test_inherited_ds_accelerator_is_warned_on_a_gpu_rank(monkeypatch, capsys):
    """Faked: a cuda:0 device object. DS_ACCELERATOR=cpu stays (DeepSpeed here runs on CPU)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(distributed, "_warned", set())
    distributed.configure_cpu_deepspeed(torch.device("cuda", 0))
    distributed.configure_cpu_deepspeed(torch.device("cuda", 0))
    err = capsys.readouterr().err
    assert err.count("zerotune: warning: DS_ACCELERATOR=cpu is set") == 1


@pytest.mark.parametrize(
    "environ, gpus, wants, expect_problem, expect_line",
    [
        ({}, 0, None, None, "device: CPU"),  # the bare template: trains on CPU, says so
        ({"SLURM_GPUS_ON_NODE": "0"}, 0, None, None, "device: CPU"),
        ({"SLURM_TRES_PER_TASK": "cpu=4"}, 0, None, None, "device: CPU"),
        ({"ZEROTUNE_REQUIRE_GPU": "0"}, 0, None, None, "device: CPU"),
        ({"SLURM_GPUS_PER_NODE": "4"}, 0, None, "SLURM_GPUS_PER_NODE=4", "NO GPU"),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, 0, None, "SLURM_GPUS_PER_NODE=a100:4", "NO GPU"),
        ({"SLURM_JOB_GPUS": "0"}, 0, None, "SLURM_JOB_GPUS=0", "NO GPU"),  # GPU id 0 is a GPU
        ({"SLURM_TRES_PER_TASK": "cpu=4,gres/gpu=1"}, 0, None, "SLURM_TRES_PER_TASK", "NO GPU"),
        ({"ZEROTUNE_REQUIRE_GPU": "1"}, 0, None, "unset ZEROTUNE_REQUIRE_GPU", "NO GPU"),
        ({}, 0, fp16_problem("fp16", False), "precision=bf16 or fp32", "NO GPU"),
        ({"SLURM_GPUS_PER_NODE": "4"}, 4, None, None, "device: 4 GPU(s)"),
        ({}, 2, fp16_problem("fp16", False), None, "device: 2 GPU(s)"),
    ],
)
def test_batch_job_device_check_table(environ, gpus, wants, expect_problem, expect_line):
    line, problem = job_device_check(environ, gpus, ["NVIDIA H100"] * gpus, wants)
    assert expect_line in line
    if expect_problem is None:
        assert problem is None
    else:
        assert expect_problem in problem and "torch sees no GPU" in problem


def test_requested_gpus_names_the_variable():
    assert requested_gpus({}) is None
    assert requested_gpus({"SLURM_GPUS": "8"}) == "SLURM_GPUS=8"
    assert requested_gpus({"ZEROTUNE_REQUIRE_GPU": "yes"}) == "ZEROTUNE_REQUIRE_GPU=yes"


def test_config_says_when_it_needs_a_gpu():
    assert config_wants_gpu("fp32") is None and config_wants_gpu("bf16") is None
    assert "fp16" in config_wants_gpu("fp16")
    assert "nccl" in config_wants_gpu("fp32", "nccl")


def test_jobcheck_entry_point(monkeypatch, capsys):
    """What slurm/train.sbatch runs before srun, on this CPU machine: 0 and a CPU line, or 2."""
    for key in ("ZEROTUNE_REQUIRE_GPU", "SLURM_GPUS_PER_NODE", "SLURM_JOB_GPUS", "SLURM_GPUS"):
        monkeypatch.delenv(key, raising=False)
    assert jobcheck.main([str(TINY)]) == 0
    assert capsys.readouterr().out.startswith("device: CPU")
    monkeypatch.setenv("ZEROTUNE_REQUIRE_GPU", "1")
    assert jobcheck.main([str(TINY), "--run-dir", "x"]) == 2
    assert "ZEROTUNE_REQUIRE_GPU=1" in capsys.readouterr().err
    monkeypatch.delenv("ZEROTUNE_REQUIRE_GPU")
    assert jobcheck.main([str(TINY), "--set", "precision=fp16"]) == 2
    assert "precision='fp16' is not supported on this device" in capsys.readouterr().err


def test_deepspeed_rank_vars_leave_cpu_ranks_alone():
    env = detect_env(TORCHRUN)
    assert deepspeed_rank_vars(env, None, {}) == {"LOCAL_RANK": "1"}
    assert deepspeed_rank_vars(env, 0, {}) == {"LOCAL_RANK": "0"}
