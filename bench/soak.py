"""Soak: many randomized fault-injection trials on a deployed federation, and a table.

    .venv/bin/python bench/soak.py                      # 15 minutes, every fault kind in turn
    .venv/bin/python bench/soak.py --trials 5 --minutes 20 --seed 7
    .venv/bin/python bench/soak.py --kinds site-publishing,broker-restart --trials 10

One RabbitMQ node of its own (never the machine's broker, which a restart would disturb) and
one process per party, as deployed: three sites and the aggregator, site-2's spool on a small
tmpfs (root is needed to mount it). Each trial runs a tiny job (FedAvg, CWT or ensemble, two
rounds, models in 4 KiB chunks) and injects one fault at a random point: a SIGKILL of a site
while it receives, trains or publishes (exactly between two chunks, through the node's test
freeze hook), of the aggregator mid-round or while it accepts a job, connections closed by
the broker, a broker restart, a site that never comes back (FedAvg with a quorum), a ring
site that is down when the token reaches it, a full spool disk. Each outcome is audited
against a fault-free run of the same job (``tests/faults.py``): the final model bit for bit,
every update and hop accounted for once in the lineage, nothing left in a journal or queue,
no dead letter that is not a refused copy.

Kinds take turns until each has ``--trials`` or ``--minutes`` have passed (a trial under way
is finished). Prints one row per kind: trials, how many faults landed where aimed (a random
point can lie past the job's end, or a kill "while training" come after it), completed
correctly, lost anything (must be 0), final model the fault-free one, mean job time; then
every trial that was not correct.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.jobspec import Algorithm
from relay.journal import SPOOL_HEADROOM
from tests.faults import (
    SITES,
    Baselines,
    Deployment,
    FaultError,
    Problem,
    Recipe,
    ScratchBroker,
    Trial,
    absent_from_fedavg,
    absent_from_ring,
    close_connections,
    fill_spool,
    kill_at,
    kill_while_training,
    mount_tmpfs,
    restart_broker,
    restart_plain,
    unmount,
)

ROUNDS = 2
RECIPES = {
    "fedavg": Recipe(Algorithm.FEDAVG, ROUNDS),
    "cwt": Recipe(Algorithm.CWT, ROUNDS),
    "ensemble": Recipe(Algorithm.ENSEMBLE, 1),
}
ADAM_KEPT = Recipe(Algorithm.FEDAVG, ROUNDS, keep_optimizer_state=True)
"""A site keeps Adam's moments between rounds, in memory: a restart loses them."""
QUORUM_TIMEOUT_S = 10.0
DISK_SITE = "site-2"

Run = Callable[[Deployment, Baselines, random.Random], Trial]


def _recipe(rng: random.Random, *names: str) -> Recipe:
    return RECIPES[rng.choice(names)]


def site_receiving(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    recipe, site = _recipe(rng, "fedavg", "cwt", "ensemble"), rng.choice(SITES)
    k = rng.randint(1, recipe.received_models(site) * recipe.model_chunks)
    point = f"ack:model:{k}"
    return kill_at(
        d, recipe, base.get(d, recipe), party=site, point=point, kind="site killed receiving"
    )


def site_training(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    recipe, site = _recipe(rng, "fedavg", "cwt", "ensemble"), rng.choice(SITES)
    visit = rng.randint(1, recipe.rounds if recipe.algorithm is not Algorithm.ENSEMBLE else 1)
    delay = rng.uniform(0.0, 0.3)
    return kill_while_training(
        d, recipe, base.get(d, recipe), site=site, visit=visit, delay_s=delay
    )


def site_training_adam_kept(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    site, visit, delay = rng.choice(SITES), rng.randint(1, ROUNDS), rng.uniform(0.0, 0.3)
    return kill_while_training(
        d, ADAM_KEPT, base.get(d, ADAM_KEPT), site=site, visit=visit, delay_s=delay
    )


def site_publishing(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    recipe, site = _recipe(rng, "fedavg", "cwt", "ensemble"), rng.choice(SITES)
    if rng.random() < 0.2:  # its lineage step, published just before its model
        point = f"publish:lineage:{rng.randint(1, recipe.sent_models(site))}"
    else:
        k = rng.randint(1, recipe.sent_models(site) * recipe.model_chunks)
        point = f"publish:{recipe.sent_kind}:{k}"
    return kill_at(
        d, recipe, base.get(d, recipe), party=site, point=point, kind="site killed publishing"
    )


def aggregator_mid_round(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    recipe = _recipe(rng, "fedavg", "cwt")
    chunks, sites = recipe.model_chunks, len(recipe.sites)
    if recipe.algorithm is Algorithm.FEDAVG:
        choices = [
            # broadcasting a later round's model, or the final one (the first round's
            # goes out as the job starts)
            f"publish:model:{rng.randint(chunks * sites + 1, chunks * sites * (ROUNDS + 1))}",
            f"ack:update:{rng.randint(1, chunks * sites * ROUNDS)}",
            f"ack:lineage:{rng.randint(1, sites * ROUNDS)}",
        ]
    else:
        choices = [
            f"ack:lineage:{rng.randint(1, sites * ROUNDS)}",
            f"ack:model:{chunks + rng.randint(1, chunks)}",  # the final token
        ]
    return kill_at(
        d,
        recipe,
        base.get(d, recipe),
        party="aggregator",
        point=rng.choice(choices),
        kind="aggregator killed mid-round",
    )


def aggregator_accepting(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    recipe = _recipe(rng, "fedavg", "cwt")
    points = ["ack:job_spec:1", f"ack:model:{rng.randint(1, recipe.model_chunks)}"]
    return kill_at(
        d,
        recipe,
        base.get(d, recipe),
        party="aggregator",
        point=rng.choice(points),
        kind="aggregator killed accepting a job",
    )


def _a_round(recipe: Recipe, rng: random.Random) -> int:
    """A FedAvg round to inject in (ring jobs' state stays in round 0)."""
    return rng.randint(0, recipe.rounds - 1) if recipe.algorithm is Algorithm.FEDAVG else 0


def connections(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    recipe = _recipe(rng, "fedavg", "cwt")
    # Jobs are short (a round takes about a second): close early in the round.
    at = sorted(rng.uniform(0.0, 0.6) for _ in range(rng.randint(1, 3)))
    every = rng.random() < 0.5

    def choose(names: list[str]) -> list[str]:
        return names if every or not names else [rng.choice(names)]

    return close_connections(
        d,
        recipe,
        base.get(d, recipe),
        at_s=at,
        choose=choose,
        after_round=rng.randint(0, recipe.rounds - 1)
        if recipe.algorithm is Algorithm.FEDAVG
        else 0,
    )


def broker_restart(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    recipe = _recipe(rng, "fedavg", "cwt")
    after_round = _a_round(recipe, rng)
    return restart_broker(
        d,
        recipe,
        base.get(d, recipe),
        after_s=rng.uniform(0.0, 1.5),
        down_s=rng.uniform(1.0, 6.0),
        after_round=after_round,
    )


def never_back(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    site = rng.choice(SITES)
    others = tuple(s for s in SITES if s != site)
    quorum = Recipe(Algorithm.FEDAVG, 1, min_sites=2, round_timeout_s=QUORUM_TIMEOUT_S)
    alone = Recipe(Algorithm.FEDAVG, 1, sites=others)
    return absent_from_fedavg(d, quorum, base.get(d, alone), site=site)


def ring_absent(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    recipe = RECIPES["cwt"]
    return absent_from_ring(
        d, recipe, base.get(d, recipe), site=rng.choice(SITES), back_after_s=rng.uniform(0.5, 4)
    )


def disk_full(d: Deployment, base: Baselines, rng: random.Random) -> Trial:
    recipe = _recipe(rng, "fedavg", "cwt")
    k = rng.randint(1, recipe.received_models(DISK_SITE) * recipe.model_chunks)
    return fill_spool(
        d,
        recipe,
        base.get(d, recipe),
        site=DISK_SITE,
        point=f"ack:model:{k}",
        mount=d.spool(DISK_SITE),
    )


KINDS: dict[str, Run] = {
    "site-receiving": site_receiving,
    "site-training": site_training,
    "site-publishing": site_publishing,
    "site-training-adam-kept": site_training_adam_kept,
    "aggregator-mid-round": aggregator_mid_round,
    "aggregator-accepting": aggregator_accepting,
    "connections-closed": connections,
    "broker-restart": broker_restart,
    "site-never-back": never_back,
    "ring-site-absent": ring_absent,
    "spool-disk-full": disk_full,
}


def heal(d: Deployment) -> None:
    """Between trials: no freeze point anywhere, every party running."""
    for party in ("aggregator", *d.sites):
        d.freeze(party, None)
        if not d.alive(party) or d.frozen(party):
            restart_plain(d, party)


def determinism(d: Deployment, base: Baselines) -> list[str]:
    """Each recipe's fault-free run again: is its final model bit for bit the same?"""
    lines = []
    for name, recipe in [*RECIPES.items(), ("fedavg, Adam kept", ADAM_KEPT)]:
        first = base.get(d, recipe)
        again = Baselines().get(d, recipe)
        same = first.final_digest == again.final_digest
        lines.append(f"{name}: {'identical' if same else 'DIFFERENT'} ({first.final_digest})")
    return lines


def table(trials: list[Trial]) -> str:
    rows = [
        "| kind | trials | fault landed | completed correctly | lost anything "
        "| same model as fault-free | mean job time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    kinds = list(dict.fromkeys(t.kind for t in trials))
    for kind in kinds:
        group = [t for t in trials if t.kind == kind]
        same = sum(1 for t in group if t.same_model)
        rows.append(
            f"| {kind} | {len(group)} | {sum(t.reached for t in group)} | "
            f"{sum(t.correct for t in group)} | "
            f"{sum(1 for t in group if t.lost)} | {same}/{len(group)} | "
            f"{statistics.mean(t.seconds for t in group):.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="Trials per kind  [5]")
    parser.add_argument("--minutes", type=float, default=15.0, help="Time budget  [15]")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the random fault points")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"Comma-separated, of: {', '.join(KINDS)}"
    )
    parser.add_argument("--json", type=Path, default=None, help="Also write every trial here")
    args = parser.parse_args()
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose from {list(KINDS)}")
    rng = random.Random(args.seed)
    budget = time.monotonic() + args.minutes * 60
    broker = ScratchBroker()
    root = Path(tempfile.mkdtemp(prefix="fedrelay-soak-"))
    # Tiny jobs end within a minute even with a fault: one that has not after two has stalled.
    deployment = Deployment(root, broker, job_timeout_s=120)
    mount_tmpfs(deployment.spool(DISK_SITE), SPOOL_HEADROOM + 32 * 2**20)
    trials: list[Trial] = []
    try:
        deployment.start_all()
        base = Baselines()
        print("fault-free runs repeated:", flush=True)
        for line in determinism(deployment, base):
            print(f"  {line}", flush=True)
        counts = dict.fromkeys(kinds, 0)
        while time.monotonic() < budget and any(n < args.trials for n in counts.values()):
            for kind in kinds:
                if counts[kind] >= args.trials or time.monotonic() >= budget:
                    continue
                try:
                    trial = KINDS[kind](deployment, base, rng)
                except FaultError as e:
                    trial = Trial(kind, "harness", [Problem(f"harness: {e}", lost=False)], 0.0)
                trial.kind = kind
                counts[kind] += 1
                trials.append(trial)
                verdict = "ok" if trial.correct else "; ".join(map(str, trial.problems))[:400]
                print(
                    f"{len(trials):3d} {trial.kind}: {trial.point} "
                    f"({trial.seconds:.1f} s): {verdict}",
                    flush=True,
                )
                heal(deployment)
    finally:
        deployment.stop()
        unmount(deployment.spool(DISK_SITE))
        broker.stop()
    print()
    print(table(trials))
    failed = [t for t in trials if not t.correct]
    if failed:
        print("\nnot correct:")
        for t in failed:
            print(f"- {t.kind}, {t.point}: " + "; ".join(map(str, t.problems))[:1500])
    garbage = sum(1 for t in trials for p in t.problems if str(p).startswith("litter: "))
    print(f"\npartial chunk transfers left in spools after their job (litter): {garbage}")
    print(f"logs and spools: {root}")
    if args.json is not None:
        records = [
            {
                "kind": t.kind,
                "point": t.point,
                "correct": t.correct,
                "lost": [str(p) for p in t.lost],
                "problems": [str(p) for p in t.problems],
                "same_model": t.same_model,
                "seconds": t.seconds,
                "notes": t.notes,
            }
            for t in trials
        ]
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
