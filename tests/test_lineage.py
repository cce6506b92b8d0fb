"""Model lineage: every step that made a final model, signed, and checked offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from node.audit import audit
from node.results import LINEAGE_KEY, MODEL_FILE
from node.simulate import SimulationConfig, simulate
from relay.lineage import model_digest
from relay.security import Roster, generate

FEDRELAY = str(Path(sys.executable).parent / "fedrelay")
TINY = {"sites": 3, "volume_size": 16, "cases_per_site": 4, "width": 4, "depth": 3}


def run(tmp_path: Path, **options: Any) -> Path:
    output = tmp_path / "run"
    result = simulate(SimulationConfig.model_validate(TINY | options), output)
    assert result.status == "done"
    return output


def rewrite(folder: Path, change: Any) -> None:
    """Rewrite the model file with ``change`` applied to its (tensors, lineage)."""
    path = folder / MODEL_FILE
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    records = json.loads(metadata[LINEAGE_KEY])
    change(tensors, records)
    metadata[LINEAGE_KEY] = json.dumps(records)
    save_file(tensors, str(path), metadata=metadata)
    (folder / "lineage.json").write_text(json.dumps(records))


def roster(folder: Path) -> Roster:
    return Roster.load(folder / "roster.json")


def test_the_digest_of_a_model_is_its_tensors_not_their_order_or_encoding() -> None:
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2, dtype=torch.int64)}
    assert model_digest(a) == model_digest(dict(reversed(a.items())))
    assert model_digest(a) != model_digest(a | {"w": a["w"].clone().add_(1e-6)})
    assert model_digest(a) != model_digest(a | {"w": a["w"].reshape(3, 2)})
    assert model_digest(a) != model_digest(a | {"b": a["b"].to(torch.int32)})


@pytest.mark.parametrize(
    ("algorithm", "rounds", "steps"),
    [
        ("fedavg", 2, {"initial": 1, "train": 6, "aggregate": 2, "final": 1}),
        ("cwt", 2, {"initial": 1, "train": 6, "final": 1}),
        ("swt", 1, {"initial": 1, "train": 3, "final": 1}),
        ("ensemble", 1, {"initial": 1, "train": 3, "final": 1}),
    ],
)
def test_every_workflows_model_ships_with_a_lineage_that_verifies(
    tmp_path: Path, algorithm: str, rounds: int, steps: dict[str, int]
) -> None:
    output = run(tmp_path, algorithm=algorithm, rounds=rounds)
    verdict, spec = audit(output, roster(output))
    assert verdict.ok, verdict.problems
    assert verdict.steps == steps
    assert set(verdict.parties) == {"aggregator", *spec.sites}
    done = subprocess.run(
        [FEDRELAY, "lineage", "verify", str(output / MODEL_FILE), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["ok"] is True


@pytest.fixture(scope="module")
def fedavg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("lineage"), algorithm="fedavg", rounds=2)


def copy_of(run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in run.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


def problems_after(fedavg: Path, tmp_path: Path, change: Any) -> list[str]:
    folder = copy_of(fedavg, tmp_path)
    rewrite(folder, change)
    verdict, _ = audit(folder, roster(folder))
    assert not verdict.ok
    return verdict.problems


def test_a_record_altered_after_signing_fails_verification(fedavg: Path, tmp_path: Path) -> None:
    def inflate(_: Any, records: list[dict[str, Any]]) -> None:
        train = next(r for r in records if r["step"] == "train")
        train["sample_count"] *= 10  # a site claiming more cases than it trained on

    problems = problems_after(fedavg, tmp_path, inflate)
    assert any("record 1" in p and "forged or tampered" in p for p in problems), problems


def test_a_removed_step_breaks_the_chain(fedavg: Path, tmp_path: Path) -> None:
    def drop_first_aggregate(_: Any, records: list[dict[str, Any]]) -> None:
        records.remove(next(r for r in records if r["step"] == "aggregate"))

    problems = problems_after(fedavg, tmp_path, drop_first_aggregate)
    assert any("that no earlier step made" in p for p in problems), problems


def test_a_model_file_with_other_weights_fails_verification(fedavg: Path, tmp_path: Path) -> None:
    def nudge(tensors: dict[str, torch.Tensor], _: Any) -> None:
        name = next(n for n, t in tensors.items() if t.is_floating_point())
        tensors[name] = tensors[name] + 1e-3

    problems = problems_after(fedavg, tmp_path, nudge)
    assert any("is not the saved model" in p for p in problems), problems


def test_a_lineage_checked_against_another_federations_roster_fails(
    fedavg: Path, tmp_path: Path
) -> None:
    parties = ["aggregator", "site-1", "site-2", "site-3"]
    stranger = generate("sim", parties, encrypt_payloads=False)[0]
    verdict, _ = audit(fedavg, stranger)
    assert not verdict.ok
    assert all("forged or tampered" in p for p in verdict.problems[:3]), verdict.problems
    unchecked, _ = audit(fedavg, None)
    assert not unchecked.ok and unchecked.unsigned == unchecked.records
    done = subprocess.run(
        [FEDRELAY, "lineage", "verify", str(copy_of(fedavg, tmp_path)), "--roster", "/dev/null"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0 and "roster" in done.stderr
