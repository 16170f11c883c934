"""The correlated-Gaussian MI benchmark (Poole et al. 2019, Fig. 2; Song & Ermon 2020).

x ~ N(0, I_d), y = rho x + sqrt(1 - rho^2) eps, true I(x; y) = -(d/2) log(1 - rho^2). The true MI
climbs a staircase (2, 4, 6, 8, 10 nats); a critic is trained with each estimator for a fixed
number of Adam steps per level, without re-initialisation between levels, and the per-step
estimates are recorded.

    .venv/bin/python benchmarks/mi_gaussian.py --out benchmarks/out/mi_gaussian
    .venv/bin/python benchmarks/mi_gaussian.py --estimators infonce,smile5 --critic concat --cubic
    .venv/bin/python benchmarks/mi_gaussian.py --critic cosine --out benchmarks/out/mi_gaussian_cosine

Prints a table (mean and std of the estimate over the last 1000 steps of each level) and the wall
time per estimator; writes results.json and mi_gaussian.png (estimate vs step, with the true-MI
staircase and the log K line) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from torch import nn

from infomax.method import bounds

ALL_ESTIMATORS = ",".join([*(n for n in bounds.BOUNDS if n != "smile"), "js_nwj", "smile5", "smile1", "ba"])


def js_reference_readout(s: torch.Tensor) -> torch.Tensor:
    """JS training with the NWJ(S) readout of Poole et al.'s colab and smile-mi-estimator's
    ``js_lower_bound``: I - 1/e at the JS optimum, so our ``js`` (NWJ(S + 1)) can be set beside the
    papers' figures."""
    objective = bounds.js_objective(s)
    return objective + (bounds.nwj(s) - objective).detach()


def rho_for(mi: float, d: int) -> float:
    return math.sqrt(1 - math.exp(-2 * mi / d))


def sample(batch: int, d: int, mi: float, cubic: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    rho = rho_for(mi, d)
    x = torch.randn(batch, d, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(batch, d, generator=g)
    return x, (y**3 if cubic else y)


def mlp(inp: int, hidden: int, out: int, layers: int = 2) -> nn.Sequential:
    """The reference critic network of Poole et al.'s colab and ermongroup/smile-mi-estimator
    (``utils.mlp``): Linear-ReLU, then ``layers`` more Linear-ReLU, then a Linear output layer."""
    mods: list[nn.Module] = [nn.Linear(inp, hidden), nn.ReLU()]
    for _ in range(layers):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(hidden, out))


class SeparableCritic(nn.Module):
    """f(x, y) = g(x) . h(y): S[i, j] = h(y_i) . g(x_j), K x K scores in one matmul; g and h are the
    reference ``mlp(d, 256, 32, layers=2)``."""

    def __init__(self, d: int, hidden: int = 256, embed: int = 32) -> None:
        super().__init__()
        self.g, self.h = mlp(d, hidden, embed), mlp(d, hidden, embed)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.h(y) @ self.g(x).T


class CosineCritic(SeparableCritic):
    """f(x, y) = cos(g(x), h(y)) / temperature: the image study's critic (cosine of the heads' outputs over tau),
    so every score lies in [-1/tau, 1/tau] and no estimator can read far past what that cap allows."""

    def __init__(self, d: int, temperature: float) -> None:
        super().__init__(d)
        self.temperature = temperature

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g, h = nn.functional.normalize(self.g(x), dim=1), nn.functional.normalize(self.h(y), dim=1)
        return h @ g.T / self.temperature


class ConcatCritic(nn.Module):
    """f(x, y) = MLP([x, y]) over all K x K pairs (joint critic; the reference ``mlp(2 d, 256, 1, layers=2)``)."""

    def __init__(self, d: int, hidden: int = 256) -> None:
        super().__init__()
        self.f = mlp(2 * d, hidden, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        pairs = torch.cat([x[None, :, :].expand(k, k, -1), y[:, None, :].expand(k, k, -1)], dim=2)  # [i, j] = (x_j, y_i)
        return self.f(pairs).squeeze(-1)


def make_estimator(name: str, d: int, critic: str,
                   temperature: float = 0.2) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """(trainable module, estimate(x, y) -> scalar nats). Maximising the estimate trains the module."""
    if name == "ba":
        decoder = bounds.GaussianDecoder(d, d)
        entropy = 0.5 * d * math.log(2 * math.pi * math.e)  # H(x) is known: x ~ N(0, I_d)
        return decoder, lambda x, y: bounds.barber_agakov(decoder.log_prob(x, y), entropy)
    f = {"separable": lambda: SeparableCritic(d), "cosine": lambda: CosineCritic(d, temperature),
         "concat": lambda: ConcatCritic(d)}[critic]()
    if name == "tuba":  # NWJ with a learned baseline a(y): log a(y_i) from an MLP on y
        baseline = mlp(d, 256, 1)
        return nn.ModuleList([f, baseline]), lambda x, y: bounds.tuba(f(x, y), baseline(y).squeeze(-1))
    knobs = SimpleNamespace(mine_ema=0.1, smile_tau=5.0)
    if name in bounds.BOUNDS and bounds.BOUNDS[name].stateful:  # MINE: its moving average trains with the critic
        state = bounds.build_bound(name, knobs)
        return nn.ModuleList([f, state]), lambda x, y: state(f(x, y))
    # every registered bound (smile at its default tau 5, as smile5), and the readouts the papers compare
    fns = {n: bounds.build_bound(n, knobs) for n in bounds.BOUNDS}
    fns.update({"js_nwj": js_reference_readout, "smile5": fns.get("smile"), "smile1": lambda s: bounds.smile(s, 1.0)})
    if name not in fns:
        raise SystemExit(f"unknown estimator '{name}'; choose from {ALL_ESTIMATORS},tuba")
    fn = fns[name]
    return f, lambda x, y: fn(f(x, y))


def train_staircase(name: str, levels: list[float], steps: int, *, d: int = 20, batch: int = 64, lr: float = 5e-4,
                    critic: str = "separable", temperature: float = 0.2, cubic: bool = False,
                    seed: int = 0) -> list[float]:
    """Per-step estimates (len(levels) * steps values) for one estimator over the staircase."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    module, estimate = make_estimator(name, d, critic, temperature)
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    trace: list[float] = []
    for mi in levels:
        for _ in range(steps):
            x, y = sample(batch, d, mi, cubic, g)
            value = estimate(x, y)
            optimizer.zero_grad(set_to_none=True)
            (-value).backward()
            optimizer.step()
            trace.append(value.item())
    return trace


def plot(results: dict, traces: dict[str, list[float]], levels: list[float], steps: int, batch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(traces)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False, sharey=True)
    truth = [mi for mi in levels for _ in range(steps)]
    for ax, name in zip(axes.flat, names):
        t = torch.tensor(traces[name])
        ax.plot(t.numpy(), lw=0.3, alpha=0.4, color="C0")
        smooth = torch.nn.functional.avg_pool1d(t[None, None], 101, 1, 50, count_include_pad=False)[0, 0]
        ax.plot(smooth.numpy(), lw=1.2, color="C0")
        ax.plot(truth, color="k", lw=1, label="true MI")
        ax.axhline(math.log(batch), color="C3", ls="--", lw=1, label="log K")
        ax.set_title(f"{name} ({results[name]['wall_s']:.0f}s)")
        ax.set_ylim(-1, max(levels) + 4)
        ax.set_xlabel("step")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("MI estimate (nats)")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--estimators", default=ALL_ESTIMATORS, help="comma-separated; also: tuba (learned baseline)")
    p.add_argument("--levels", default="2,4,6,8,10", help="true MI staircase in nats")
    p.add_argument("--steps", type=int, default=4000, help="Adam steps per level")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--dim", type=int, default=20)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--critic", choices=["separable", "cosine", "concat"], default="separable",
                   help="cosine: the image study's critic, cos(g(x), h(y)) / --temperature, scores within +-1/tau")
    p.add_argument("--temperature", type=float, default=0.2, help="the cosine critic's tau (the demo's: 0.2)")
    p.add_argument("--cubic", action="store_true", help="y -> y^3 (MI unchanged)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/out/mi_gaussian")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest and keeps timings comparable

    levels = [float(v) for v in args.levels.split(",")]
    tail = min(1000, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    traces: dict[str, list[float]] = {}
    from tqdm import tqdm

    for name in tqdm(args.estimators.split(","), desc="estimators"):
        start = time.perf_counter()
        trace = train_staircase(name, levels, args.steps, d=args.dim, batch=args.batch, lr=args.lr,
                                critic=args.critic, temperature=args.temperature, cubic=args.cubic, seed=args.seed)
        wall = time.perf_counter() - start
        traces[name] = trace
        entry: dict = {"wall_s": round(wall, 1)}
        for i, mi in enumerate(levels):
            last = torch.tensor(trace[(i + 1) * args.steps - tail : (i + 1) * args.steps])
            finite = last[torch.isfinite(last)]
            entry[f"{mi:g}"] = {"mean": finite.mean().item() if len(finite) else float("nan"),
                                "std": finite.std().item() if len(finite) > 1 else float("nan")}
        results[name] = entry

    header = "estimator | " + " | ".join(f"I={mi:g}" for mi in levels) + " | wall s"
    print(header)
    print("-" * len(header))
    for name, entry in results.items():
        cells = " | ".join(f"{entry[f'{mi:g}']['mean']:6.2f} ± {entry[f'{mi:g}']['std']:4.2f}" for mi in levels)
        print(f"{name:9s} | {cells} | {entry['wall_s']:.0f}")
    print(f"log K = {math.log(args.batch):.2f} (InfoNCE's ceiling); mean ± std over the last {tail} steps of each "
          "level")
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "estimators")}
    (out / "results.json").write_text(json.dumps({**results, "recipe": recipe}, indent=2) + "\n")
    plot(results, traces, levels, args.steps, args.batch, out / "mi_gaussian.png")
    print(f"wrote {out / 'results.json'} and {out / 'mi_gaussian.png'}")


if __name__ == "__main__":
    main()
