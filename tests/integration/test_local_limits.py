"""The account's caps hold under the local executor too: tasks and CPUs by the policy, memory by
the executor (RLIMIT_DATA on every process of the job), all on the agent's own login node."""

from __future__ import annotations

from conftest import RunnerSite, job_toml

# Builds a string of the given number of MiB in one piece of memory.
ALLOCATE = "perl -e '$x = q(a) x ({mib} * 2**20); print qq(allocated\\n)'\n"


def memory_job(name: str, script: str, memory: str) -> str:
    return job_toml(name, script=script) + f'\n[job.resources]\nmemory = "{memory}"\n'


def test_a_local_job_cannot_take_more_memory_than_it_asked_for(runner_site: RunnerSite) -> None:
    job = runner_site.write_job("greedy", memory_job("greedy", ALLOCATE.format(mib=600), "300M"))

    result = runner_site.run(job)

    assert result.returncode != 0, result.stdout
    assert "allocated" not in result.stdout
    assert "Out of memory" in result.stdout


def test_a_local_job_within_its_memory_runs_and_sees_its_limit(runner_site: RunnerSite) -> None:
    script = ALLOCATE.format(mib=100) + "grep 'Max data size' /proc/self/limits\n"
    job = runner_site.write_job("modest", memory_job("modest", script, "2G"))

    result = runner_site.run(job)

    assert result.returncode == 0, result.stderr
    limit = str(2 * 2**30)
    assert result.stdout.split() == ["allocated", "Max", "data", "size", limit, limit, "bytes"]


def test_an_mpi_job_runs_under_its_memory_limit(runner_site: RunnerSite) -> None:
    text = job_toml("ranks", command=["/usr/local/bin/mpi-hello"], tasks=2, mpi=True)
    job = runner_site.write_job("ranks", text.replace("tasks = 2\n", 'tasks = 2\nmemory = "512M"\n'))

    result = runner_site.run(job)

    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "allreduce sum 3", "rank 0 of 2", "rank 1 of 2", "world size 2"]


def test_ten_million_ranks_never_reach_mpirun(runner_site: RunnerSite) -> None:
    job = runner_site.write_job("flood", job_toml("flood", command=["/usr/local/bin/mpi-hello"],
                                                  tasks=10_000_000, mpi=True))

    result = runner_site.run(job)

    assert result.returncode == 126, result.stderr
    assert "10000000 tasks exceed account ci's max_tasks = 64" in result.stderr
    assert result.stdout == ""
