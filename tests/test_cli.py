"""``fedrelay simulate`` as a user runs it: progress, the table, results.json, the model file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from relay.storage import file_digest

FEDRELAY = str(Path(sys.executable).parent / "fedrelay")
TINY = [
    "--sites",
    "2",
    "--cases-per-site",
    "4",
    "--volume-size",
    "16",
    "--width",
    "4",
    "--depth",
    "3",
    "--local-epochs",
    "1",
]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [FEDRELAY, *args], capture_output=True, text=True, timeout=300, check=False
    )


def test_simulate_prints_the_dice_table_and_writes_results_and_model(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run("simulate", "--algorithm", "fedavg", "--rounds", "2", *TINY, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "Dice on each site's validation cases: fedavg" in done.stdout
    assert "all sites" in done.stdout and "site-2" in done.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "done"
    assert results["job"]["algorithm"] == "fedavg" and results["job"]["rounds"] == 2
    assert set(results["final"]) == {"site-1", "site-2"}
    assert {"dice_wt", "dice_tc", "dice_et", "dice_mean"} <= set(results["final_overall"])
    assert set(results["final_overall"]) <= {"dice_wt", "dice_tc", "dice_et", "dice_mean"} | {
        "hd95_wt",
        "hd95_tc",
        "hd95_et",
    }
    trained = [h for h in results["history"] if h["stage"] == "trained"]
    assert [(h["round"], h["site"]) for h in trained] == [
        (0, "site-1"),
        (0, "site-2"),
        (1, "site-1"),
        (1, "site-2"),
    ]
    assert len(results["rounds"]) == 2
    assert results["bytes_moved"]["total_bytes"] > 0
    assert results["bytes_moved"]["messages_by_kind"]["update"] == 4
    assert results["wall_time_s"] > 0
    model = out / results["model_file"]
    assert file_digest(model) == results["model_sha256"]
    with safe_open(str(model), framework="pt") as f:
        assert json.loads(f.metadata()["fedrelay_job"])["job_id"] == results["job"]["job_id"]
        assert any(key.endswith("weight") for key in f.keys())  # noqa: SIM118


def test_simulate_json_output_is_the_results_file(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run(
        "simulate",
        "--algorithm",
        "ensemble",
        "--rounds",
        "1",
        *TINY,
        "--output",
        str(out),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads((out / "results.json").read_text())
    assert printed["members"] == ["site-1", "site-2"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"member0", "member1"}  # noqa: SIM118


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sites", "0"], "--sites: Input should be greater than or equal to 1 (got 0)"),
        (["--algorithm", "swt", "--rounds", "3"], "'rounds' must be 1 for swt"),
        (["--min-sites", "5"], "'min_sites' = 5 is more than the 3 sites"),
        (["--algorithm", "fedprox"], "'fedprox' is not one of"),
        (["--heterogeneity", "2"], "--heterogeneity: Input should be less than or equal to 1"),
        (["--algorithm", "cwt", "--aggregation", "median"], "apply to fedavg only, not cwt"),
    ],
)
def test_bad_options_fail_before_any_work_with_the_option_named(
    args: list[str], message: str, tmp_path: Path
) -> None:
    done = run("simulate", *args, "--output", str(tmp_path / "never"))
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "never").exists()


def test_option_names_in_errors_are_spelled_as_on_the_command_line(tmp_path: Path) -> None:
    done = run("simulate", "--local-epochs", "0", "--output", str(tmp_path / "never"))
    assert done.returncode == 2
    assert "--local-epochs: Input should be greater than or equal to 1 (got 0)" in done.stderr


def test_simulate_can_encrypt_every_payload_and_still_trains(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run(
        "simulate",
        "--algorithm",
        "cwt",
        "--rounds",
        "2",
        *TINY,
        "--output",
        str(out),
        "--encrypt-payloads",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "done" and not result["dead_letters"]
    assert result["final_overall"]["dice_mean"] > result["initial_overall"]["dice_mean"]


def test_provision_writes_the_kits_and_refuses_to_overwrite_them(tmp_path: Path) -> None:
    source = tmp_path / "federation.toml"
    source.write_text('federation = "demo"\n[sites.site-1]\n[sites.site-2]\n')
    kits = tmp_path / "kits"
    done = run("provision", str(source), "-o", str(kits), "--encrypt-payloads")  # TLS: default
    assert done.returncode == 0, done.stderr
    for party in ("aggregator", "site-1", "site-2"):
        assert f"{party}: {kits / party}/" in done.stdout
        assert (kits / party / "tls" / "client.pem").exists()
    assert (kits / "operator" / "definitions.json").exists()
    assert "PRIVATE KEY" not in done.stdout + done.stderr
    again = run("provision", str(source), "-o", str(kits))
    assert again.returncode == 1 and "is not empty" in again.stderr
    plain = tmp_path / "plain"
    assert run("provision", str(source), "-o", str(plain), "--no-tls").returncode == 0
    assert not (plain / "site-1" / "tls").exists()
    assert "password" in (plain / "site-1" / "federation.toml").read_text()


PNG = b"\x89PNG\r\n\x1a\n"


def test_report_renders_the_results_as_markdown_with_its_plots(tmp_path: Path) -> None:
    out = tmp_path / "run"
    dp = ["--dp-clip-norm", "3", "--dp-noise-multiplier", "0.03"]
    done = run(
        "simulate", "--algorithm", "fedavg", "--rounds", "2", *TINY, *dp, "--output", str(out)
    )
    assert done.returncode == 0, done.stderr
    made = run("report", str(out))
    assert made.returncode == 0, made.stderr
    report = Path(made.stdout.strip())
    assert report == out / "report" / "report.md"
    text = report.read_text()
    result = json.loads((out / "results.json").read_text())
    assert f"**{result['final_overall']['dice_mean']:.3f}**" in text
    for image in ("dice", "regions", "traffic", "rounds", "privacy"):
        assert f"]({image}.png)" in text, image
        assert (report.parent / f"{image}.png").read_bytes().startswith(PNG), image
    for site, spent in result["privacy"].items():
        assert f"| {site} | {spent['epsilon']:,.2f} |" in text
    missing = run("report", str(tmp_path))
    assert missing.returncode == 1 and "results.json: cannot be read" in missing.stderr
    # A job that failed still gets its report (without the global curve it never finished).
    failed = tmp_path / "failed"
    failed.mkdir()
    broken = result | {"status": "failed", "reason": "site-2 never came back"}
    (failed / "results.json").write_text(json.dumps(broken))
    made = run("report", str(failed))
    assert made.returncode == 0, made.stderr
    assert "**failed**: site-2 never came back" in (failed / "report" / "report.md").read_text()
