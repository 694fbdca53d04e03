"""Environment detection tables: one case per launcher, and the precedence rules."""

from __future__ import annotations

import pytest

from trainer.env import detect_env, first_slurm_host, slurm_port, tasks_on_node

TORCHRUN = {
    "RANK": "3",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "8",
    "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "1",
    "MASTER_ADDR": "node7",
    "MASTER_PORT": "29400",
    "TORCHELASTIC_RUN_ID": "abc",
}
SLURM_STEP = {
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "8",
    "SLURM_NODEID": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[003-006]",
    "SLURM_STEP_NODELIST": "gpu[003-006]",
    "SLURM_STEP_TASKS_PER_NODE": "2(x4)",
    "SLURM_TASKS_PER_NODE": "2(x4)",
}
SBATCH_SHELL = {
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "2",
    "SLURM_JOB_ID": "77",
    "SLURM_JOB_NODELIST": "vm",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_TASKS_PER_NODE": "2",
}
OPENMPI = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}


@pytest.mark.parametrize(
    "env, expect",
    [
        ({}, dict(launcher="single", rank=0, world_size=1, local_rank=0)),
        (
            TORCHRUN,
            dict(
                launcher="torchrun",
                rank=3,
                local_rank=1,
                world_size=8,
                local_world_size=2,
                node_rank=1,
                master_addr="node7",
                master_port=29400,
            ),
        ),
        (
            SLURM_STEP,
            dict(
                launcher="slurm",
                rank=5,
                local_rank=1,
                world_size=8,
                local_world_size=2,
                node_rank=2,
                master_addr="gpu003",
                master_port=slurm_port("4242"),
                job_id="4242",
            ),
        ),
        (
            OPENMPI,
            dict(
                launcher="mpi",
                rank=1,
                world_size=2,
                local_rank=1,
                local_world_size=2,
                master_addr=None,
            ),
        ),
        ({"PMIX_RANK": "2", "PMIX_SIZE": "4"}, dict(launcher="mpi", rank=2, world_size=4)),
        (
            {"PMI_RANK": "1", "PMI_SIZE": "3", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "3"},
            dict(launcher="mpi", rank=1, world_size=3, local_rank=1),
        ),
        (
            {
                "MV2_COMM_WORLD_RANK": "3",
                "MV2_COMM_WORLD_SIZE": "4",
                "MV2_COMM_WORLD_LOCAL_RANK": "1",
                "MV2_COMM_WORLD_LOCAL_SIZE": "2",
            },
            dict(launcher="mpi", rank=3, world_size=4, local_rank=1, node_rank=1),
        ),
        # the batch shell of an sbatch job is one process, not SLURM_NTASKS of them
        (SBATCH_SHELL, dict(launcher="single", rank=0, world_size=1)),
    ],
    ids=[
        "single",
        "torchrun",
        "slurm-srun",
        "openmpi",
        "pmix",
        "pmi-hydra",
        "mvapich",
        "sbatch-shell",
    ],
)
def test_detection_table(env, expect):
    got = detect_env(env)
    for k, v in expect.items():
        assert getattr(got, k) == v, (k, got)


def test_mpirun_inside_sbatch_mpi_wins_over_inherited_slurm_procid():
    # every mpirun rank inherits SLURM_PROCID=0 from the batch shell (and a step id from
    # the allocation's step); the MPI rank must win
    env = {**SBATCH_SHELL, "SLURM_STEP_ID": "0", **OPENMPI}
    got = detect_env(env)
    assert (got.launcher, got.rank, got.world_size) == ("mpi", 1, 2)
    assert got.master_addr is None  # agreed over MPI at init, not a fixed guess


def test_srun_pmix_agreeing_ids_use_slurm_master():
    env = {
        **SLURM_STEP,
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "PMIX_RANK": "1",
        "PMIX_SIZE": "2",
    }
    got = detect_env(env)
    assert got.launcher == "slurm" and got.rank == 1 and got.master_addr == "gpu003"


def test_srun_pmix_without_pmix_size_keeps_slurm_world():
    env = {**SLURM_STEP, "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "PMIX_RANK": "1"}
    got = detect_env(env)
    assert (got.launcher, got.rank, got.world_size) == ("slurm", 1, 2)


def test_torchrun_wins_over_everything():
    got = detect_env({**SLURM_STEP, **OPENMPI, **TORCHRUN})
    assert got.launcher == "torchrun" and got.rank == 3


def test_restart_count_and_explicit_master():
    got = detect_env(
        {**SLURM_STEP, "SLURM_RESTART_COUNT": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"}
    )
    assert (got.restart_count, got.master_addr, got.master_port) == (2, "10.0.0.1", 1234)


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("vm", "vm"),
        ("gpu[003-005,9]", "gpu003"),
        ("a[1-2],b3", "a1"),
        ("node-[10-12]", "node-10"),
        ("x1,x2", "x1"),
    ],
)
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_port_is_deterministic_and_differs_between_jobs():
    assert slurm_port("123") == slurm_port("123")
    assert slurm_port("123") != slurm_port("124")
    assert 15000 <= slurm_port("987654321") < 32768


def test_bad_integer_names_the_variable():
    with pytest.raises(ValueError, match="WORLD_SIZE='two'"):
        detect_env({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "two"})


@pytest.mark.parametrize(
    "tasks, node, expect",
    [
        ("2(x4)", 3, 2),
        ("8,4", 0, 8),
        ("8,4", 1, 4),  # srun -n 12 on two 8-GPU nodes: the second node runs 4
        ("2(x3),1", 3, 1),
        ("2(x3),1", 2, 2),
        ("4", 7, 4),  # a node id outside the list: the first count
        ("", 0, None),
        ("garbage", 0, None),
    ],
)
def test_tasks_on_node(tasks, node, expect):
    assert tasks_on_node(tasks, node) == expect


def test_uneven_slurm_step_gives_each_node_its_local_world():
    env = {**SLURM_STEP, "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8,4"}
    assert detect_env(env).local_world_size == 4
    env["SLURM_NODEID"] = "0"
    assert detect_env(env).local_world_size == 8
