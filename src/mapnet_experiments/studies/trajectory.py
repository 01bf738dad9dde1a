"""`mapnet repro trajectory`: the weight-manifold picture of paper Figure 2 (§1, §2.1).

CNN2 trained directly and through a latent (Ours* 2048, structured projection), both from the
same θ₀ (the factory's initialisation under the seed) and with the same batch order, recording
the network's weight vector every `every` steps. The snapshots of both runs are projected
together by PCA (fitted on the union, so both live in one coordinate system), for the whole
vector and for each layer; t-SNE (scikit-learn) optionally. Only the 2-D coordinates and the
explained variance are written (results/figures/trajectory-<dataset>.json); the figure is drawn
from that file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapnet import MappingConfig
from mapnet.bases import build_from_factory
from mapnet.files import write_json
from mapnet_experiments.models.networks import CNN2
from mapnet_experiments.recipe.config import TrainConfig
from mapnet_experiments.recipe.splits import load_splits
from mapnet_experiments.recipe.trainer import Trainer, plain_view
from mapnet_experiments.studies.facts import Facts, read
from mapnet_experiments.studies.runner import MAPPED, PLAIN
from mapnet_experiments.studies.study import Options, Study

ROOT = Path("results/figures")
FIGURE = Path("docs/results/trajectory.png")
METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE"}
LAYERS = {  # CNN2's layers: the parameters of each
    "conv1": ("features.0.weight", "features.0.bias"),
    "conv2": ("features.3.weight", "features.3.bias"),
    "fc1": ("classifier.1.weight", "classifier.1.bias"),
    "fc2": ("classifier.3.weight", "classifier.3.bias"),
}


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        plain = plain_view(module)
        return {name: p.detach().flatten().clone() for name, p in plain.named_parameters()}


def record(config: TrainConfig, every: int, progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """Train `config` and return the weights at step 0 and every `every` steps after."""
    splits = load_splits(config)
    trainer = Trainer(config)
    snapshots = [_weights(trainer.module)]
    steps = 0

    def on_step() -> None:
        nonlocal steps
        steps += 1
        if steps % every == 0:
            snapshots.append(_weights(trainer.module))

    trainer.make_loop(len(splits["train"]), progress=progress)
    trainer.fit(splits, evaluate_test=False, after_step=on_step)
    return snapshots


def pca_2d(rows: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """(N, P) -> the (N, 2) coordinates on the first two principal axes and the fraction of
    variance each explains."""
    centred = rows.double() - rows.double().mean(0)
    _, values, right = torch.linalg.svd(centred, full_matrices=False)
    share = (values**2 / (values**2).sum()).tolist()
    return (centred @ right[:2].T).float(), share[:2]


def _tsne_class():  # type: ignore[no-untyped-def]
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ValueError(
            "--tsne needs scikit-learn: pip install 'mapnet[plots]' (make venv installs it)"
        ) from None
    return TSNE


def tsne_2d(rows: torch.Tensor, seed: int) -> torch.Tensor:
    TSNE = _tsne_class()
    perplexity = min(30.0, (len(rows) - 1) / 3)
    embedded = TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(
        rows.double().numpy()
    )
    return torch.from_numpy(embedded).float()


def run(
    dataset: str = "mnist",
    epochs: int = 2,
    every: int = 25,
    seed: int = 0,
    tsne: bool = False,
    root: Path = ROOT,
    data_dir: str | None = None,
    progress: bool = True,
    val_size: int = 5000,
) -> Path:
    """Record both runs, project them and write the coordinates; returns the JSON path (kept
    when it exists: delete it to redo)."""
    out = root / f"trajectory-{dataset}.json"
    if out.exists():
        return out
    if tsne:
        _tsne_class()  # before training: a missing scikit-learn must not cost the runs
    mapping = MappingConfig(latent_dim=2048, projection="structured", seed=seed)
    common = {
        "model": "cnn2",
        "dataset": dataset,
        "epochs": epochs,
        "seed": seed,
        "val_size": val_size,
        "data_dir": data_dir,
    }
    configs = {
        "trained directly": TrainConfig(mode="plain", **common, **PLAIN),
        "mapnet, Ours* 2048": TrainConfig(mode="mapped", mapping=mapping, **common, **MAPPED),
    }
    # Both start from the factory's θ₀ under the seed (what wrap() regenerates).
    reference = build_from_factory(CNN2, seed)
    runs = {name: record(config, every, progress) for name, config in configs.items()}
    for name, snapshots in runs.items():
        start = snapshots[0]
        for key, value in reference.named_parameters():
            if not torch.equal(start[key], value.detach().flatten()):
                raise RuntimeError(f"{name} does not start from θ₀ ({key})")
    result: dict[str, Any] = {
        "dataset": dataset,
        "epochs": epochs,
        "every": every,
        "seed": seed,
        "snapshots": {name: len(s) for name, s in runs.items()},
        "panels": {},
    }
    for panel, names in {"all weights": None, **LAYERS}.items():
        matrices = []
        for snapshots in runs.values():
            keys = names or tuple(snapshots[0])
            matrices.append(torch.stack([torch.cat([s[k] for k in keys]) for s in snapshots]))
        coordinates, share = pca_2d(torch.cat(matrices))
        split = coordinates.split([len(m) for m in matrices])
        entry = {
            "explained": share,
            "pca": {name: part.tolist() for name, part in zip(runs, split)},
        }
        if tsne:
            embedded = tsne_2d(torch.cat(matrices), seed).split([len(m) for m in matrices])
            entry["tsne"] = {name: part.tolist() for name, part in zip(runs, embedded)}
        result["panels"][panel] = entry
    write_json(out, result)
    return out


def figure(source: Path, out: Path = FIGURE, method: str = "pca") -> Path:
    """The trajectories figure from `source`'s coordinates: one panel per weight group, axes
    named (for PCA, each principal axis with the share of variance it explains)."""
    from mapnet_experiments.studies.plots import Panel, trajectories
    from mapnet_experiments.studies.report import DATASET_NAMES

    data = json.loads(source.read_text())
    panels = []
    for name, entry in data["panels"].items():
        if method not in entry:
            raise ValueError(f"{source} holds no {method} coordinates (run with --tsne)")
        if method == "pca":
            first, second = (f"{100 * share:.0f} %" for share in entry["explained"])
            axes = (f"PC 1 ({first} of variance)", f"PC 2 ({second})")
        else:
            axes = ("t-SNE 1", "t-SNE 2")
        panels.append(Panel(name, *axes, entry[method]))
    dataset = DATASET_NAMES.get(data["dataset"], data["dataset"])
    title = (
        f"CNN2 weight trajectories on {dataset}, {data['epochs']} epochs, a snapshot every "
        f"{data['every']} steps, both from the same θ₀ ({METHOD_NAMES[method]} of both runs "
        "together)"
    )
    return trajectories(panels, out, title)


def facts(results: Path) -> Facts | None:
    """The index's paragraph for Figure 2: what the figure shows and how much of the weights'
    variance its two axes hold."""
    data = read(results / ROOT.name / "trajectory-mnist.json")
    if data is None:
        return None
    explained = data["panels"]["all weights"]["explained"]
    methods = " and ".join(
        f"{name} ({count} snapshots)" for name, count in data["snapshots"].items()
    )
    paragraph = (
        f"Paper Figure 2: CNN2 on MNIST for {data['epochs']} epochs, {methods}, both from the "
        f"same θ₀ and batch order, a weight snapshot every {data['every']} steps, projected "
        "together by PCA for the whole weight vector and for each layer; the first two axes of "
        f"the whole vector hold {100 * explained[0]:.0f} % and {100 * explained[1]:.0f} % of "
        "the variance ([PCA](trajectory.png), [t-SNE](trajectory-tsne.png))."
    )
    return Facts("Weight trajectories (Figure 2)", "trajectory.png", "mapnet repro trajectory "
                 "--tsne", paragraph)  # fmt: skip


def _run(options: Options, stages: tuple[str, ...]) -> None:
    run(
        options.datasets[0],
        tsne=options.tsne,
        root=options.root_or(ROOT),
        data_dir=options.data_dir,
        progress=options.progress,
    )


def _report(options: Options) -> str:
    if not options.figures:  # the study's page is its figure
        return ""
    source = options.root_or(ROOT) / f"trajectory-{options.datasets[0]}.json"
    out = options.report_or(FIGURE)
    drawn = [figure(source, out)]
    if options.tsne:
        drawn.append(figure(source, out.with_name(out.stem + "-tsne.png"), "tsne"))
    return "\n".join(map(str, drawn))


STUDY = Study(
    name="trajectory",
    summary="paper Figure 2: CNN2 trained directly and through a latent from the same θ₀, "
    "weight snapshots projected by PCA (--tsne: also t-SNE, scikit-learn); writes "
    "results/figures/trajectory-<dataset>.json and docs/results/trajectory.png (first of "
    "--datasets)",
    stages=("train",),
    default=("train",),
    run=_run,
    report=_report,
    example="mapnet repro trajectory --datasets mnist --tsne",
    facts=facts,
)
