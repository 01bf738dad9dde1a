"""`mapnet repro space`: many CNN2 classifiers as points of one model space.

Every member is a latent z (d = 2048) of one mapping (seed 0, structured projection), so all of
them live in one coordinate system (paper §2.2; the use of such a space follows NetSpace,
"Learning the Space of Deep Models", and hypernetworks that map per-instance embeddings to
weights). Stages:

    train     the population (12 members: Fashion-MNIST in 4 data orders and on 2 half
              subsets, MNIST in 2 orders, and the two class halves 0–4 / 5–9 of each data
              set; space_training), two Fashion-MNIST members trained with path flattening,
              two started at independent random latents (the mapped "independent inits"),
              and the weight-space controls: plain CNN2s from two inits, and from one init in
              two orders (mapnet train). 5 epochs each.
    analyse   accuracy along straight paths (z for members; weights for the plain controls),
              uniform and greedy soups of the Fashion-MNIST members, latent optimisation (on
              the task loss from a soup or from z = 0; by distillation from a plain CNN2),
              PCA / t-SNE of the latents by epoch; -> results/space/analysis.json
    speed     batched forward of 256 members (torch.func.vmap) against a Python loop, with
              the largest output difference; -> results/space/speed.json (run it alone)

`--report` writes docs/results/space.md and its figures from those files. Choices (soup
membership) use the validation split; test figures are reported only.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mapnet import ModelSpace
from mapnet.files import write_json
from mapnet_experiments.models.networks import CNN2, Siren
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.run import train
from mapnet_experiments.recipe.splits import Split
from mapnet_experiments.recipe.state import load_model
from mapnet_experiments.recipe.trainer import build, evaluate
from mapnet_experiments.studies.space import summary
from mapnet_experiments.studies.space.training import (
    LATENTS_FILE,
    Member,
    SpaceRun,
    member_splits,
    train_space,
)
from mapnet_experiments.studies.study import Options, Study

ROOT = Path("results/space")
REPORT = Path("docs/results/space.md")
EPOCHS = 5
VAL_SIZE = 5000
FMNIST, MNIST = "fashion-mnist", "mnist"
LOW, HIGH = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]

POPULATION = [
    *(Member(f"fmnist-s{seed}", FMNIST, seed) for seed in range(4)),
    *(Member(f"fmnist-half-s{seed}", FMNIST, seed, train_fraction=0.5) for seed in (4, 5)),
    *(Member(f"mnist-s{seed}", MNIST, seed) for seed in range(2)),
    Member("fmnist-0to4", FMNIST, 0, classes=LOW),
    Member("fmnist-5to9", FMNIST, 0, classes=HIGH),
    Member("mnist-0to4", MNIST, 0, classes=LOW),
    Member("mnist-5to9", MNIST, 0, classes=HIGH),
]
# The midpoint loss's weights tried; the one with the smallest largest barrier on the
# validation split is reported (ties: the smaller weight). Run folder per weight.
FLATTEN_WEIGHTS = (0.3, 1.0, 3.0)
FLATTENED = [Member("fmnist-s0", FMNIST, 0), Member("fmnist-s1", FMNIST, 1)]
# Two members from independent random latents z ~ N(0, 1): with the init_std scaling each
# tensor starts one init std away from θ₀, the mapped analogue of two independent inits.
INDEPENDENT_STD = 1.0
INDEPENDENT = [Member(m.label, FMNIST, m.seed, start_std=INDEPENDENT_STD) for m in FLATTENED]
# The weight-space controls: name -> (seed: batch order and init, init_seed).
PLAIN = {"plain-s0": (0, None), "plain-s1": (1, None), "plain-s1-init0": (1, 0)}
PLAIN_LR = 1e-3  # Table 1's plain recipe
PATH_STEPS = 11
OPTIMISE_STEPS = 100  # latent optimisation from a soup or z = 0: Adam steps of batch 128
DISTIL_STEPS = 430  # one epoch of Fashion-MNIST's training images, labels unused


def flattened_name(weight: float) -> str:
    return "flattened" if weight == 1.0 else f"flattened-{weight:g}"


def space_run(name: str, data_dir: str | None = None) -> SpaceRun:
    if name == "population":
        return SpaceRun(POPULATION, epochs=EPOCHS, val_size=VAL_SIZE, data_dir=data_dir)
    if name == "independent":
        return SpaceRun(INDEPENDENT, epochs=EPOCHS, val_size=VAL_SIZE, data_dir=data_dir)
    weight = next(w for w in FLATTEN_WEIGHTS if flattened_name(w) == name)
    return SpaceRun(FLATTENED, epochs=EPOCHS, flatten=weight, val_size=VAL_SIZE, data_dir=data_dir)


def plain_config(name: str, data_dir: str | None = None) -> TrainConfig:
    seed, init_seed = PLAIN[name]
    return TrainConfig(
        mode="plain",
        dataset=FMNIST,
        epochs=EPOCHS,
        lr=PLAIN_LR,
        seed=seed,
        init_seed=init_seed,
        split_seed=0,  # the population's validation split, whatever the order
        val_size=VAL_SIZE,
        data_dir=data_dir,
    )


def train_all(root: Path = ROOT, data_dir: str | None = None, progress: bool = True) -> None:
    """Every run of the study; each resumes where it stopped, finished ones are kept."""
    for name in ("population", *(flattened_name(w) for w in FLATTEN_WEIGHTS), "independent"):
        out = root / name
        train_space(space_run(name, data_dir), out, resume=out.exists(), progress=progress)
    for name in PLAIN:
        out = root / name
        train(plain_config(name, data_dir), progress=progress, out_dir=out, resume=out.exists())


# ---------------------------------------------------------------------- analysis


def _accuracy(module: nn.Module, split: Split) -> float:
    return evaluate(module, split)["acc"]


def _plain(root: Path, name: str, data_dir: str | None) -> nn.Module:
    module = build(plain_config(name, data_dir))
    load_model(module, root / name / "checkpoint")
    return module


def _blend(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict:
    return {k: (1 - t) * a[k] + t * b[k] for k in a}


def _barrier(accuracy: list[float]) -> dict[str, float]:
    ends = (accuracy[0] + accuracy[-1]) / 2
    return {"endpoints_mean": ends, "midpoint": accuracy[len(accuracy) // 2],
            "barrier_midpoint": ends - accuracy[len(accuracy) // 2],
            "barrier_max": ends - min(accuracy)}  # fmt: skip


def latent_path(space: ModelSpace, a: int, b: int, splits: dict[str, Split]) -> dict[str, Any]:
    rows = {"val": [], "test": []}
    for z in space.path(a, b, PATH_STEPS):
        plain = space.materialize_at(z)
        for name in rows:
            rows[name].append(_accuracy(plain, splits[name]))
    return rows | {"barrier": _barrier(rows["test"]), "val_barrier": _barrier(rows["val"])}


def weight_path(a: nn.Module, b: nn.Module, splits: dict[str, Split]) -> dict[str, Any]:
    rows = {"val": [], "test": []}
    sa, sb = a.state_dict(), b.state_dict()
    for t in torch.linspace(0, 1, PATH_STEPS).tolist():
        model = CNN2()
        model.load_state_dict(_blend(sa, sb, t))
        for name in rows:
            rows[name].append(_accuracy(model, splits[name]))
    return rows | {"barrier": _barrier(rows["test"]), "val_barrier": _barrier(rows["val"])}


def _batches(split: Split, steps: int, seed: int, batch: int = 128):
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=generator)
    for step in range(steps):
        chosen = order[(step * batch) % len(split) :][:batch]
        yield split.inputs[chosen], split.targets[chosen]


def analyse(root: Path = ROOT, data_dir: str | None = None, tsne: bool = True) -> dict[str, Any]:
    population = space_run("population", data_dir)
    space = ModelSpace.load(root / "population" / "space", CNN2)
    splits, _ = member_splits(population)
    labels = [m.label for m in population.members]
    fm = splits[labels.index("fmnist-s0")]  # the shared Fashion-MNIST val / test splits
    result: dict[str, Any] = {"members": labels}

    a, b = labels.index("fmnist-s0"), labels.index("fmnist-s1")
    plains = {name: _plain(root, name, data_dir) for name in PLAIN}
    flattening = {}
    for weight in FLATTEN_WEIGHTS:
        pair = ModelSpace.load(root / flattened_name(weight) / "space", CNN2)
        flattening[f"{weight:g}"] = latent_path(pair, 0, 1, fm)
    chosen = min(FLATTEN_WEIGHTS, key=lambda w: flattening[f"{w:g}"]["val_barrier"]["barrier_max"])
    result["flattening"] = {"weights": flattening, "chosen": chosen}
    result["paths"] = {
        "mapped (one space, z)": latent_path(space, a, b, fm),
        "mapped, path flattening (z)": flattening[f"{chosen:g}"],
        "mapped, independent starts (z)": latent_path(
            ModelSpace.load(root / "independent" / "space", CNN2), 0, 1, fm
        ),
        "plain, independent inits (weights)": weight_path(
            plains["plain-s0"], plains["plain-s1"], fm
        ),
        "plain, one init (weights)": weight_path(plains["plain-s0"], plains["plain-s1-init0"], fm),
    }

    fashion = [i for i, m in enumerate(population.members) if m.task == FMNIST]

    def val_score(z: torch.Tensor) -> float:
        return _accuracy(space.materialize_at(z), fm["val"])

    def test_of(z: torch.Tensor) -> float:
        return _accuracy(space.materialize_at(z), fm["test"])

    members = {labels[i]: {"val": val_score(space.latents[i]), "test": test_of(space.latents[i])}
               for i in fashion}  # fmt: skip
    best = max(members, key=lambda k: members[k]["val"])
    uniform = space.uniform_soup(fashion)
    greedy, chosen = space.greedy_soup(val_score, fashion)
    result["soups"] = {
        "members": members,
        "best member (by validation)": {"name": best, **members[best]},
        "uniform soup": {"val": val_score(uniform), "test": test_of(uniform)},
        "greedy soup": {
            "val": val_score(greedy),
            "test": test_of(greedy),
            "members": [labels[i] for i in chosen],
        },
    }

    loss = nn.functional.cross_entropy
    starts = {
        "z = 0 (the mapping's start)": torch.zeros(space.latent_dim),
        "uniform soup of all 12 members": space.uniform_soup(),
        "Fashion-MNIST greedy soup": greedy,
    }
    optimised = {}
    for name, start in starts.items():
        z = space.optimise_latent(start, _batches(fm["train"], OPTIMISE_STEPS, 0), loss, lr=0.1)
        optimised[name] = {"start_test": test_of(start), "test": test_of(z), "val": val_score(z)}
    result["optimise"] = {"steps": OPTIMISE_STEPS, "rows": optimised}

    teacher = plains["plain-s0"].eval()

    def teacher_batches():
        for x, _ in _batches(fm["train"], DISTIL_STEPS, 1):
            with torch.no_grad():  # not around the yield: the student's step runs there
                soft = teacher(x).softmax(1)
            yield x, soft

    def distil_loss(logits: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, probabilities)  # soft targets: KL + const

    student = space.optimise_latent(torch.zeros(space.latent_dim), teacher_batches(),
                                    distil_loss, lr=0.1)  # fmt: skip
    with torch.no_grad():
        agree = (
            (space.materialize_at(student)(fm["test"].inputs).argmax(1)
             == teacher(fm["test"].inputs).argmax(1)).float().mean().item() * 100
        )  # fmt: skip
    result["distillation"] = {
        "steps": DISTIL_STEPS,
        "teacher_test": _accuracy(teacher, fm["test"]),
        "student_test": test_of(student),
        "agreement": agree,
        "labels_one_epoch_test": json.loads((root / "population" / "results.json").read_text())[
            "history"
        ][0]["members"][a]["test_acc"],
    }

    by_epoch = load_file(str(root / "population" / LATENTS_FILE))["latents"]  # (E, N, d)
    result["embedding"] = _embedding(by_epoch, [m.task for m in population.members], tsne)
    write_json(root / "analysis.json", result)
    return result


def _embedding(by_epoch: torch.Tensor, tasks: list[str], tsne: bool) -> dict[str, Any]:
    from mapnet_experiments.studies.trajectory import pca_2d, tsne_2d

    epochs, count, _ = by_epoch.shape
    rows = by_epoch.reshape(epochs * count, -1)
    points, share = pca_2d(rows)
    out = {
        "tasks": tasks * epochs,
        "epochs": [e + 1 for e in range(epochs) for _ in range(count)],
        "pca": points.tolist(),
        "pca_variance": share,
    }
    if tsne:
        out["tsne"] = tsne_2d(rows, seed=0).tolist()
    return out


# ---------------------------------------------------------------------- speed


def _median_seconds(call: Callable[[], Any], repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def speed(root: Path = ROOT, members: int = 256, repeats: int = 5) -> dict[str, Any]:
    """vmap forward of `members` members against a loop, under no_grad, 1 thread; beside them
    the weights alone, generated member by member and batched (the part of the work that
    every member's own weights make unavoidable)."""
    from torch.func import vmap

    from mapnet import MappingConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cases = [
        ("SIREN 2-32-32-1, 64 coordinates", Siren, (64, 2), 128),
        ("SIREN 2-32-32-1, 784 coordinates (28×28)", Siren, (784, 2), 128),
        ("CNN2, batch 1", CNN2, (1, 1, 28, 28), 2048),
        ("CNN2, batch 32", CNN2, (32, 1, 28, 28), 2048),
    ]
    rows = []
    try:
        for label, factory, shape, d in cases:
            config = MappingConfig(latent_dim=d, projection="structured")
            space = ModelSpace(factory, config, members)
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                space.latents.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
                batched = space(x, chunk_size=None)
                looped = space.loop_forward(x)
                rows.append({
                    "case": label, "members": members, "latent_dim": d,
                    "vmap_ms": 1000 * _median_seconds(
                        lambda s=space, x=x: s(x, chunk_size=None), repeats),
                    "loop_ms": 1000 * _median_seconds(
                        lambda s=space, x=x: s.loop_forward(x), repeats),
                    "generate_ms": 1000 * _median_seconds(
                        lambda s=space: [s.generate(z) for z in s.latents], repeats),
                    "generate_vmap_ms": 1000 * _median_seconds(
                        lambda s=space: vmap(s.generate)(s.latents), repeats),
                    "max_abs_difference": (batched - looped).abs().max().item(),
                })  # fmt: skip
            rows[-1]["speedup"] = rows[-1]["loop_ms"] / rows[-1]["vmap_ms"]
            print(f"{label}: vmap {rows[-1]['vmap_ms']:.1f} ms, loop {rows[-1]['loop_ms']:.1f} ms")
    finally:
        torch.set_num_threads(threads)
    result = {"threads": 1, "rows": rows, "torch": torch.__version__}
    write_json(root / "speed.json", result)
    return result


# ---------------------------------------------------------------------- report


def report(
    root: Path = ROOT, out: Path = REPORT, data_dir: str | None = None, draw: bool = True
) -> str:
    """docs/results/space.md and its figures (unless `draw` is False) from root (the INR
    figure also reads the test images, from data_dir)."""
    if not (root / "analysis.json").exists():
        raise FileNotFoundError(
            f"{root / 'analysis.json'} is missing: run `mapnet repro space --stages analyse` "
            "(after --stages train) first"
        )
    analysis = json.loads((root / "analysis.json").read_text())
    population = json.loads((root / "population" / "config.json").read_text())
    plain = json.loads((root / "plain-s0" / "config.json").read_text())
    mapping = population["mapping"]
    paths = analysis["paths"]
    barriers = {name: path["barrier"]["barrier_max"] for name, path in paths.items()}
    flat = barriers["mapped, path flattening (z)"]
    speed = _read_json(root / "speed.json")
    inr = _read_json(root / "inr" / "summary.json")
    lines = [
        "# A model space: CNN2 classifiers as latents of one mapping",
        "",
        f"Generated by `mapnet repro space --report` from `{root}/`. Every member is a latent "
        f"(d = {mapping['latent_dim']}) of one mapping (seed {mapping['seed']}, "
        f"{mapping['projection']} projection), trained {population['epochs']} epochs of Adam "
        f"(lr {population['lr']:g}, batch {population['batch_size']}), the members side by "
        "side, one batch each per step (an epoch is the full training split's step count for "
        "every member, so a member on a subset sees it several times). The plain controls are "
        f"CNN2 trained directly ({plain['epochs']} epochs of Adam, lr {plain['lr']:g}) on the "
        "same validation split. Fashion-MNIST test accuracy %; the shared validation split made "
        "every choice.",
        "",
        "Targets: a barrier ≤ 1 point between two members of one space is met with path "
        f"flattening ({flat:.2f}), not without ({barriers['mapped (one space, z)']:.2f}). "
        + _speed_target(speed)
        + _inr_target(inr),
        "",
        "## Interpolation: accuracy along the straight path between two members",
        "",
        f"{PATH_STEPS} evenly spaced points; the barrier is the endpoints' mean accuracy minus "
        "the path's (at the midpoint, and the largest anywhere), on the test split and on the "
        "shared validation split. Both mapped members start at z = 0, which generates exactly "
        "the plain runs' seed-0 initialisation: the like-for-like plain control is \"one "
        'init", which they lose to without flattening. The "independent starts" pair starts '
        f"at two random latents z ~ N(0, {INDEPENDENT_STD:g}²), each tensor one init std away "
        "from θ₀ (still sharing it: not as far apart as two independent plain inits). Each "
        "flattened pair was trained in a "
        "space of its own two members, with the midpoint loss at weight "
        f"{', '.join(f'{w:g}' for w in FLATTEN_WEIGHTS)}; the row shows weight "
        f"{analysis['flattening']['chosen']:g}, the smallest largest barrier on validation "
        "(all weights below).",
        "",
        "| pair | endpoints (mean) | midpoint | barrier at the midpoint | largest barrier | "
        "largest barrier, validation |",
        "|---|---|---|---|---|---|",
    ]
    for name, path in analysis["paths"].items():
        bar = path["barrier"]
        lines.append(
            f"| {name} | {path['test'][0]:.2f} / {path['test'][-1]:.2f} "
            f"({bar['endpoints_mean']:.2f}) | {bar['midpoint']:.2f} | "
            f"{bar['barrier_midpoint']:.2f} | {bar['barrier_max']:.2f} | "
            f"{path['val_barrier']['barrier_max']:.2f} |"
        )
    if "mapped, independent starts (z)" in barriers:
        lines += [
            "",
            "From independent starts the mapped pair's largest barrier is "
            f"{barriers['mapped, independent starts (z)']:.2f}, against "
            f"{barriers['plain, independent inits (weights)']:.2f} for two plain CNN2s from "
            "independent inits: the shared coordinates alone do not connect two members. What "
            "connects them is their shared start, as one init does for plain CNN2s "
            f"({barriers['plain, one init (weights)']:.2f}); path flattening then brings the "
            f"shared-start pair from {barriers['mapped (one space, z)']:.2f} to {flat:.2f}.",
        ]
    lines += [
        "",
        "| path-flattening weight | endpoints, validation | largest barrier, validation | "
        "endpoints, test | largest barrier, test |",
        "|---|---|---|---|---|",
        *(
            f"| {w} | {f['val'][0]:.2f} / {f['val'][-1]:.2f} | "
            f"{f['val_barrier']['barrier_max']:.2f} | {f['test'][0]:.2f} / {f['test'][-1]:.2f} | "
            f"{f['barrier']['barrier_max']:.2f} |"
            for w, f in analysis["flattening"]["weights"].items()
        ),
        "",
        "![paths](space-paths.png)",
        "",
    ]
    soups = analysis["soups"]
    lines += [
        f"## Soups of the {len(analysis['soups']['members'])} Fashion-MNIST members "
        "(4 data orders, 2 half subsets)",
        "",
        "| | validation | test |",
        "|---|---|---|",
        *(
            f"| member {k} | {v['val']:.2f} | {v['test']:.2f} |"
            for k, v in soups["members"].items()
        ),
        f"| best member by validation ({soups['best member (by validation)']['name']}) | "
        f"{soups['best member (by validation)']['val']:.2f} | "
        f"{soups['best member (by validation)']['test']:.2f} |",
        f"| uniform soup (mean latent) | {soups['uniform soup']['val']:.2f} | "
        f"{soups['uniform soup']['test']:.2f} |",
        f"| greedy soup ({', '.join(soups['greedy soup']['members'])}) | "
        f"{soups['greedy soup']['val']:.2f} | {soups['greedy soup']['test']:.2f} |",
        "",
    ]
    optimise = analysis["optimise"]
    lines += [
        f"## Latent optimisation: {optimise['steps']} Adam steps (batch 128, lr 0.1) on the "
        "Fashion-MNIST loss",
        "",
        "| start | test at the start | test after | validation after |",
        "|---|---|---|---|",
        *(
            f"| {k} | {v['start_test']:.2f} | {v['test']:.2f} | {v['val']:.2f} |"
            for k, v in optimise["rows"].items()
        ),
        "",
    ]
    distil = analysis["distillation"]
    lines += [
        f"Distillation: a latent from z = 0 fitted for {distil['steps']} steps to the softmax "
        f"of a plain CNN2 (test {distil['teacher_test']:.2f}) on unlabelled training images "
        f"reaches {distil['student_test']:.2f} and agrees with the teacher on "
        f"{distil['agreement']:.1f} % of the test images; a member trained on the labels for "
        f"one epoch reached {distil['labels_one_epoch_test']:.2f} (the teacher itself trained "
        f"{plain['epochs']} epochs on the labels).",
        "",
        "## The latents, by epoch and task",
        "",
        "![latents](space-latents.png)",
        "",
    ]
    if speed is not None:
        speed_rows, speed_threads = speed["rows"], speed["threads"]
        lines += [
            f"## Batched forward of {speed_rows[0]['members']} members (`torch.func.vmap`) "
            "against a Python loop",
            "",
            f"`mapnet repro space --stages speed`, {speed_threads} thread, no_grad, median of "
            "5. The "
            '"weights alone" columns generate every member\'s weights and run nothing, '
            "member by member and batched by vmap. Each member's weights are its own, so no "
            "forward of all members takes less than the faster of the two: the loop's time "
            'over it bounds the speed-up any batching could give ("at most"; the forward\'s '
            "own arithmetic, which batching does not remove either, bounds it further).",
            "",
            "| case | vmap | loop | speed-up | weights alone, loop | weights alone, vmap | "
            "at most | largest difference |",
            "|---|---|---|---|---|---|---|---|",
            *(
                f"| {r['case']} | {r['vmap_ms']:.1f} ms | {r['loop_ms']:.1f} ms | "
                f"{r['speedup']:.1f}× | "
                + (
                    f"{r['generate_ms']:.1f} ms | {r['generate_vmap_ms']:.1f} ms | "
                    f"{_speedup_bound(r):.1f}×"
                    if "generate_vmap_ms" in r
                    else "– | – | –"
                )
                + f" | {r['max_abs_difference']:.1e} |"
                for r in speed_rows
            ),
            "",
            "The outputs differ from the loop's by float rounding: batched kernels sum in "
            "another order, so bit-identity is not on offer; the largest difference is "
            f"{max(r['max_abs_difference'] for r in speed_rows):.1e}.",
            "",
        ]
    if inr is not None:
        from mapnet_experiments.studies.space.inr import report_section

        lines += report_section(inr)
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    if draw and inr is not None:  # first: it reads the test images, which may be missing
        from mapnet_experiments.studies.space.inr import FIGURE, figure

        figure(root / "inr", out.parent / FIGURE, data_dir)
    if draw:
        figures(analysis, out.parent)
    out.write_text(text)
    return text


def _read_json(file: Path) -> Any:
    return json.loads(file.read_text()) if file.exists() else None


def _speedup_bound(row: dict[str, Any]) -> float:
    """The loop's time over the weights' generation alone (the faster way): no batched
    forward can beat it, since each member's weights are its own."""
    return row["loop_ms"] / min(row["generate_ms"], row["generate_vmap_ms"])


def _speed_target(speed: dict[str, Any] | None) -> str:
    """The vmap target (256 members ≥ 5× faster than a loop), judged on speed.json."""
    if speed is None:
        return "The vmap target is not measured yet (--stages speed). "
    rows = speed["rows"]

    def case(row: dict[str, Any]) -> str:
        bound = ""
        if "generate_vmap_ms" in row:
            bound = f"; at most {_speedup_bound(row):.1f}× if the forward cost nothing"
        return f"{row['case']} ({row['speedup']:.1f}×{bound})"

    met = [case(r) for r in rows if r["speedup"] >= 5]
    missed = [case(r) for r in rows if r["speedup"] < 5]
    return (
        "A batched forward of 256 members ≥ 5× faster than a loop is met for "
        + ("; ".join(met) if met else "no case")
        + (f"; not for {'; '.join(missed)}" if missed else "")
        + " (the vmap section); the outputs agree to float rounding, not bit for bit. "
    )


def _inr_target(summary: dict[str, Any] | None) -> str:
    """The INR classification targets, judged on the headline rows (chosen on validation)."""
    if summary is None:
        return "The INR targets are not measured yet (--stages inr)."
    from mapnet_experiments.studies.space.inr import judged_targets

    judged = judged_targets(summary)
    return f"Classifying INRs from their latents (the INR section): {judged}."


def figures(analysis: dict[str, Any], folder: Path) -> list[Path]:
    from mapnet_experiments.studies.plots import Panel, interpolation_paths, latent_scatter

    paths = {name: path["test"] for name, path in analysis["paths"].items()}
    made = [interpolation_paths(paths, folder / "space-paths.png",
                                "Fashion-MNIST test accuracy along straight paths")]  # fmt: skip
    embedding = analysis["embedding"]
    first, second = (f"{100 * share:.0f} %" for share in embedding["pca_variance"])
    panels = [Panel("PCA", f"PC 1 ({first} of variance)", f"PC 2 ({second})",
                    {"latents": embedding["pca"]})]  # fmt: skip
    if "tsne" in embedding:
        panels.append(Panel("t-SNE", "t-SNE 1", "t-SNE 2", {"latents": embedding["tsne"]}))
    epochs = embedding["epochs"]
    last = max(epochs)
    made.append(
        latent_scatter(
            panels,
            [task_name(task) for task in embedding["tasks"]],
            folder / "space-latents.png",
            f"every member's latent after each of its {last} epochs, by task (paler: earlier)",
            shade=[(e - 1) / max(last - 1, 1) for e in epochs],
        )
    )
    return made


def task_name(task: str) -> str:
    """A member's task for a legend: "fashion-mnist:[0, 1, 2, 3, 4]" -> "Fashion-MNIST,
    classes 0–4" (Member.task's form: the data set, then the classes when not all)."""
    from mapnet_experiments.studies.report import DATASET_NAMES

    dataset, _, classes = task.partition(":")
    name = DATASET_NAMES.get(dataset, dataset)
    if not classes:
        return f"{name}, all classes"
    chosen = json.loads(classes)
    if chosen == list(range(chosen[0], chosen[-1] + 1)):
        return f"{name}, classes {chosen[0]}–{chosen[-1]}"
    return f"{name}, classes {', '.join(map(str, chosen))}"


def _run(options: Options, stages: tuple[str, ...]) -> None:
    root = options.root_or(ROOT)
    for stage in stages:
        if stage == "train":
            train_all(root, options.data_dir, progress=options.progress)
        elif stage == "analyse":
            analyse(root, options.data_dir, tsne=options.tsne)
        elif stage == "speed":
            speed(root)
        elif stage == "inr":
            from mapnet_experiments.studies.space import inr

            inr.run(root / "inr", options.data_dir, options.datasets)


STUDY = Study(
    name="space",
    summary="a model space: 12 CNN2 classifiers as latents of one mapping, 2 trained with path "
    "flattening, plain controls; stages train, analyse (paths, soups, latent optimisation, "
    "distillation, PCA; --tsne: t-SNE too), speed (256 members by vmap vs a loop: run it "
    "alone), inr (one SIREN per image, classified from its latent; one process per data set: "
    "--datasets mnist); writes docs/results/space.md and its figures",
    stages=("train", "analyse", "speed", "inr"),
    default=("train", "analyse"),
    run=_run,
    report=lambda options: report(
        options.root_or(ROOT), options.report_or(REPORT), options.data_dir, options.figures
    ),
    example="mapnet repro space --stages inr --datasets fashion-mnist --threads 1",
    page="space.md",
    facts=summary.facts,
)
