"""The benchmark scripts run end to end with --quick and write their JSON results.

Only that they work is checked, never what they measured: timings on a shared machine are
not a pass/fail criterion. Results go to a temporary file so that the committed
bench/results stay the latest full measurement.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from conftest import Cluster

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_SECONDS = 300


def run_bench(cluster: Cluster, script: str, output: Path) -> dict[str, Any]:
    argv = [str(cluster.venv / "bin" / "python"), str(REPO / "bench" / script), "--quick",
            "--output", str(output)]
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
                            check=False)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "| variant |" in result.stdout
    data: dict[str, Any] = json.loads(output.read_text())
    assert data["quick"] is True
    for key in ("benchmark", "date", "settings", "machine", "commands", "duration_seconds"):
        assert key in data, key
    for key in ("cores", "kernel", "apptainer", "openmpi"):
        assert key in data["machine"], key
    return data


def test_sandbox_overhead_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "sandbox_overhead.py", tmp_path / "sandbox_overhead.json")
    assert data["benchmark"] == "sandbox_overhead"
    variants = data["variants"]
    assert set(variants) == {"bare true", "apptainer exec IMAGE true", "product sandbox"}
    for entry in variants.values():
        assert {"ms", "ratio_to_bare", "added_ms_over_bare", "ratio_to_plain_apptainer"} <= set(entry)
        assert {"median", "p10", "p90"} <= set(entry["ms"])
    product = data["commands"]["product sandbox"]
    assert {"--contain", "--cleanenv", "--no-eval", "--no-home", "--net"} <= set(product)


def test_mpi_latency_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "mpi_latency.py", tmp_path / "mpi_latency.json")
    assert data["benchmark"] == "mpi_latency"
    assert set(data["sizes"]) == {"4", "1048576"}
    for size, entry in data["sizes"].items():
        assert {"iterations", "sandbox_target_met", "variants"} <= set(entry)
        assert set(entry["variants"]) == {"bare host MPI", "sandbox", "sandbox without --sharens"}
        for stats in entry["variants"].values():
            assert {"latency_us", "ratio_to_bare", "other_load"} <= set(stats)
            assert {"median", "p10", "p90"} <= set(stats["latency_us"])
        commands = data["commands"][size]
        assert "--sharens" in commands["sandbox"]
        assert "--sharens" not in commands["sandbox without --sharens"]


def test_mpiexec_inside_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "mpiexec_inside.py", tmp_path / "mpiexec_inside.json")
    assert data["benchmark"] == "mpiexec_inside"
    variants = data["variants"]
    assert set(variants) == {"mpiexec from inside", "srun from outside"}
    assert {"paired_ratio_to_outside", "added_ms_over_outside"} <= set(variants["mpiexec from inside"])
    for entry in variants.values():
        assert len(entry["samples_ms"]) == data["settings"]["rounds"]
    assert "srun" in data["commands"]["srun from outside"]
    assert "sandbox.mpiexec_launcher" in data["commands"]["mpiexec from inside"]


def test_buildkite_log_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "buildkite_log.py", tmp_path / "buildkite_log.json")
    assert data["benchmark"] == "buildkite_log"
    assert {"agent_mb_s", "cat_mb_s", "ratio_to_cat", "agent_peak_rss_mb"} <= set(data["throughput"])
    assert {"p50_s", "p99_s", "lines"} <= set(data["latency"])
    assert {"jobs", "agent_cpu_seconds", "agent_peak_rss_mb"} <= set(data["many_jobs"])


def test_github_requests_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "github_requests.py", tmp_path / "github_requests.json")
    assert data["benchmark"] == "github_requests"
    assert {"idle", "label", "comment", "push", "label_long", "budget"} <= set(data["results"])


def test_gateway_answer_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "gateway_answer.py", tmp_path / "gateway_answer.json")
    assert data["benchmark"] == "gateway_answer"
    assert {"stored_s", "dropped_s", "large_body_s"} <= set(data["results"])


def test_workspace_copy_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "workspace_copy.py", tmp_path / "workspace_copy.json")
    assert data["benchmark"] == "workspace_copy"
    assert {tree["tree"] for tree in data["results"]} == {"source tree", "data"}
    for tree in data["results"]:
        assert set(tree["variants"]) == {"cp -a", "copy in", "copy back, nothing changed",
                                         "copy back, every file changed"}


def test_hub_api_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "hub_api.py", tmp_path / "hub_api.json")
    assert data["benchmark"] == "hub_api"
    results = data["results"]
    assert {"submission", "log_latency", "followers", "throughput"} <= set(results)
    assert {"submit_ms", "status_ms", "ratio_p50_to_status"} <= set(results["submission"])
    assert {"lag_ms", "hub_cpu_percent", "hub_peak_rss_mb"} <= set(results["followers"])
    assert {"cat", "raw 4 MiB appends"} <= set(results["throughput"]["variants"])


def test_remote_log_latency_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "remote_log_latency.py", tmp_path / "remote_log_latency.json")
    assert data["benchmark"] == "remote_log_latency"
    results = data["results"]
    assert {"remote_run", "output_file", "added_by_hub_path", "hub_cpu_percent"} <= set(results)
    for path in ("remote_run", "output_file"):
        assert {"p50", "p90", "p99", "max"} <= set(results[path]["lag_ms"])
    # Every line the job printed reached the client.
    assert results["remote_run"]["lag_ms"]["n"] == data["settings"]["lines"]
    assert {"hub", "agent", "client", "job"} <= set(data["commands"])


def test_dashboard_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "dashboard.py", tmp_path / "dashboard.json")
    assert data["benchmark"] == "dashboard"
    results = data["results"]
    assert {"live", "large_page", "viewers"} <= set(results)
    live = results["live"]
    # Every line the agent wrote was seen in the page and by the API's follower.
    assert live["page_lag_ms"]["n"] == live["api_follow_lag_ms"]["n"] == data["settings"]["live_lines"]
    assert {"large", "small", "first_open_ms", "load_earlier_ms"} <= set(results["large_page"])
    assert {"median_ms", "p90_ms", "max_ms"} <= set(results["large_page"]["large"])
    for entry in results["viewers"].values():
        assert {"lag_ms", "hub_cpu_percent", "hub_peak_rss_mb"} <= set(entry)
    assert {"hub", "browser"} <= set(data["commands"])


def test_outputs_quick(cluster: Cluster, tmp_path: Path) -> None:
    data = run_bench(cluster, "outputs.py", tmp_path / "outputs.json")
    assert data["benchmark"] == "outputs"
    assert {entry["set"] for entry in data["results"]} == {"large", "small"}
    for entry in data["results"]:
        assert set(entry["variants"]) == {"sha256sum", "hashlib, read only", "cp -r + sha256sum",
                                          "collect_outputs"}
        assert {"target_ratio", "target_met"} <= set(entry)
        for stats in entry["variants"].values():
            assert {"ratio_to_sha256sum", "ratio_to_cp_and_sha256sum", "mb_s"} <= set(stats)
