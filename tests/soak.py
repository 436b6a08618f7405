"""Soak the rerun guarantees: the model-based test's state machine for N minutes, random seeds.

    python tests/soak.py --minutes 30                  # both APIs, new sequences all the time
    python tests/soak.py --api openai --seed 1234      # one batch again, as a failure named it
    python tests/soak.py --ray --minutes 10            # some runs on a Ray cluster it starts (issue 24)

CI runs the same machine derandomized, with a few dozen steps (tests/test_model_based.py); this
runs it for as long as you give it, each batch of examples with a seed of its own, so that every
run explores sequences CI never tried. Each failure is shrunk by Hypothesis towards its shortest
sequence of steps (for --shrink-seconds at most). At the end: steps run, examples, failures found,
and for each kind of failure the shortest failing sequence with its seed. Exit 1 if anything failed.
With --ray it starts a Ray cluster of one node (`ray start --head`, killed at the end) and plays the
machine's Ray variant: each run, killed ones too, drawn to go to the cluster (--ray ADDRESS) or not.

    LLAVA_CAPTION_SCRIPT=../main/llava-caption-ollama.py python tests/soak.py   # another tree's script
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, stand_in_ollama, the machine

from hypothesis import HealthCheck, seed, settings
from hypothesis.internal.conjecture import engine
from hypothesis.stateful import run_state_machine_as_test
from ray_cluster import Head
from stand_in_ollama import StandInOllama
from test_model_based import Bench, Counters, Violation, machine

EXAMPLES_PER_BATCH = 5  # between two looks at the clock: a batch takes ~10-60 s


@dataclass
class Failure:
    api: str
    seed: int
    kind: str
    message: str
    steps: list[str]  # the shortest failing sequence, as Hypothesis printed it

    @property
    def length(self) -> int:
        checks = ("state.teardown()", "state.disk_as_the_model_says()")
        return sum(1 for line in self.steps if line.startswith("state.") and line not in checks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to soak (default 10)")
    parser.add_argument("--api", choices=("ollama", "openai", "both"), default="both")
    parser.add_argument("--steps", type=int, default=25, help="steps per example (default 25)")
    parser.add_argument("--seed", type=int, help="run one batch with this seed (from a failure's report)")
    parser.add_argument(
        "--ray",
        action="store_true",
        help="start a Ray cluster of one node and send some runs to it (pip install -r tests/requirements.txt)",
    )
    parser.add_argument(
        "--shrink-seconds",
        type=float,
        default=120.0,
        help="how long a batch's failures are shrunk, at most (default 120; Hypothesis's own limit is 300)",
    )
    args = parser.parse_args(argv)
    apis = ["ollama", "openai"] if args.api == "both" else [args.api]
    servers: list[StandInOllama] = []

    def make_server(**settings_of_server: object) -> StandInOllama:
        servers.append(StandInOllama(**settings_of_server).start())
        return servers[-1]

    head = Head() if args.ray else None  # before the clock starts: it takes 2-15 s
    counters = Counters()
    failures: list[Failure] = []
    started = time.monotonic()
    deadline = started + args.minutes * 60
    batches = 0
    with tempfile.TemporaryDirectory(prefix="soak-") as scratch:
        benches = [Bench.start(api, Path(scratch), make_server, ray=head) for api in apis]
        for bench in benches:
            bench.counters = counters
        try:
            while True:
                bench = benches[batches % len(benches)]
                batch_seed = args.seed if args.seed is not None else random.getrandbits(32)
                batches += 1
                # Every shrinking step reruns the script, so a failure's shortest sequence costs
                # minutes: bounded, so that the soak goes on finding others and --minutes holds
                # within a batch or so. (Hypothesis reads this limit of its own at each shrink.)
                left = deadline - time.monotonic()
                engine.MAX_SHRINKING_SECONDS = int(max(30, min(args.shrink_seconds, left)))
                found = soak_batch(bench, batch_seed, args.steps)
                failures += found
                elapsed = time.monotonic() - started
                on_ray = f", {counters.on_ray} on Ray" if head else ""
                print(
                    f"[{elapsed / 60:5.1f} min] {bench.api} seed {batch_seed}: "
                    f"{'FAILED ' + ', '.join(f.kind for f in found) if found else 'ok'}; "
                    f"{counters.steps} steps ({counters.runs} runs{on_ray}), {counters.examples} examples so far",
                    flush=True,
                )
                if args.seed is not None or time.monotonic() >= deadline:
                    break
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        finally:
            for server in servers:
                server.stop()
            if head:
                head.stop()
    report(failures, counters, time.monotonic() - started, args.ray)
    return 1 if failures else 0


def soak_batch(bench: Bench, batch_seed: int, steps: int) -> list[Failure]:
    """One batch of examples from one seed; the failures, each shrunk."""
    batch_settings = settings(
        max_examples=EXAMPLES_PER_BATCH,
        stateful_step_count=steps,
        derandomize=False,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    try:
        run_state_machine_as_test(seed(batch_seed)(machine(bench)), settings=batch_settings)
    except Exception as error:  # noqa: BLE001 - one failure, or an ExceptionGroup of several distinct ones
        return [failure(bench.api, batch_seed, one) for one in getattr(error, "exceptions", [error])]
    return []


def failure(api: str, batch_seed: int, error: BaseException) -> Failure:
    kind = (
        type(error).__name__
        if isinstance(error, Violation)
        else f"error in the harness: {type(error).__name__}"
    )
    message = str(error).split("\n--- stderr:")[0]
    notes = list(getattr(error, "__notes__", []))
    if "Explanation:" in notes:  # Hypothesis's lines of code that only failing cases ran: not steps
        notes = notes[: notes.index("Explanation:")]
    return Failure(api, batch_seed, kind, message, notes)


def report(failures: list[Failure], counters: Counters, seconds: float, ray: bool = False) -> None:
    on_ray = f", {counters.on_ray} sent on Ray ({counters.killed_on_ray} killed there)" if ray else ""
    print(
        f"\nsoaked {seconds / 60:.1f} min: {counters.steps} steps ({counters.runs} runs of the script, "
        f"{counters.styled} with --also, {counters.joined} with --join{on_ray}; "
        f"{counters.listed} failed lists checked, {counters.listed_some} naming some, {counters.loops} "
        f"redo loops by one list, {counters.kept_unreached} lists kept what a run did not reach; "
        f"{counters.rejected} requests rejected), "
        f"{counters.examples} examples (shrinking included), {len(failures)} failures found"
    )
    kinds: dict[str, list[Failure]] = {}
    for one in failures:
        kinds.setdefault(one.kind, []).append(one)
    for kind, found in sorted(kinds.items()):
        shortest = min(found, key=lambda one: one.length)
        print(
            f"  {kind}: {len(found)} times, shortest {shortest.length} steps ({shortest.api}, seed {shortest.seed})"
        )
    for kind, found in sorted(kinds.items(), key=lambda item: min(one.length for one in item[1])):
        shortest = min(found, key=lambda one: one.length)
        again = f"--api {shortest.api}{' --ray' if ray else ''} --seed {shortest.seed}"
        print(f"\nshortest failing sequence of {kind} ({again}):")
        print("\n".join(line for line in shortest.steps if line != "state.disk_as_the_model_says()"))
        print(f"\n{shortest.message}")


if __name__ == "__main__":
    sys.exit(main())
