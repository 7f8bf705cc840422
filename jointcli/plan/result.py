"""What a plan holds: for each step, its phases (LM calls, tokens, seconds), what it trains, its
warnings. `Plan.to_json()` is what `jointopt plan --json` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Calls:
    """LM calls of a phase: at least `low`, at most `high`, `expected` the estimate; as the plan shows it:

    >>> print(Calls.exact(100), Calls(96, 96, 96, approximate=True), Calls(4, 24, 10))
    100 ~96 4-24 (~10)
    """

    low: int
    high: int
    expected: int
    approximate: bool = False  # the count is DSPy's estimate, or depends on the model's answers

    @classmethod
    def exact(cls, n: int) -> Calls:
        """A count known in advance: an evaluation's, a bootstrap's."""
        return cls(n, n, n)

    def __str__(self) -> str:
        if self.low == self.high and not self.approximate:
            return f"{self.low:,}"
        if self.low == self.high:
            return f"~{self.expected:,}"
        return f"{self.low:,}-{self.high:,} (~{self.expected:,})"


@dataclass
class Phase:
    """One phase of a step: an optimizer's compile(), a bootstrap, LoRA training, an evaluation."""

    calls: Calls
    tokens_in: int  # prompt tokens (training: tokens trained on)
    tokens_out: int  # completion tokens, at most
    seconds: float | None = None  # with a probe


@dataclass
class StepPlan:
    """One step of the schedule as it will run: its phases, what it trains, its warnings."""

    step: str  # the folder the step will have (00-baseline, 01-p, 02-w, ...), or "test"
    kind: str  # baseline, p, w or test
    optimizer: str | None = None  # its key under `optimizers`
    method: str | None = None  # the DSPy optimizer, or LoRA
    demos: dict[str, int] = field(default_factory=dict)  # demos per module in the program it evaluates
    phases: dict[str, Phase] = field(default_factory=dict)  # optimizer, bootstrap, train, dev, test
    train: dict[str, dict] = field(default_factory=dict)  # w: per adapter: rows, steps, LoRA, memory
    warnings: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float | None:
        """The phases' seconds together; None without a probe."""
        times = [p.seconds for p in self.phases.values()]
        return None if None in times else sum(times)


@dataclass
class Plan:
    """The plan of a recipe's schedule (build_plan): the machine, each module's model, every step."""

    recipe: str
    strategy: str
    machine: dict  # cpu kind, device, memory available
    modules: dict[str, dict]  # module -> model key, type, path, architecture, parameters
    steps: list[StepPlan]
    probe: dict | None = None

    @property
    def seconds(self) -> float | None:
        """The steps' seconds together; None without a probe."""
        times = [s.seconds for s in self.steps]
        return None if None in times else sum(times)

    @property
    def warnings(self) -> list[str]:
        """Every step's warnings, each after its step's folder."""
        return [f"{s.step}: {w}" for s in self.steps for w in s.warnings]

    def to_json(self) -> dict:
        """What `jointopt plan --json` prints."""
        steps = [{**asdict(s), "seconds": s.seconds} for s in self.steps]
        return {
            "recipe": self.recipe,
            "strategy": self.strategy,
            "machine": self.machine,
            "modules": self.modules,
            "steps": steps,
            "seconds": self.seconds,
            "probe": self.probe,
            "warnings": self.warnings,
        }
