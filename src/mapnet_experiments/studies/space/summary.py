"""The model-space study's facts for the results index (studies.facts): paths and their
controls, soups, distillation, the INR population and the batched forward, every figure from
results/space/ and every comparison word decided by the numbers."""

from __future__ import annotations

from pathlib import Path

from mapnet_experiments.studies.facts import Facts, listing, read


def _than(value: float, other: float, more: str, less: str) -> str:
    return more if value > other else less


def facts(results: Path) -> Facts | None:
    from mapnet_experiments.studies.report import DATASET_NAMES
    from mapnet_experiments.studies.space.inr import chosen_row, judged_targets

    root = results / "space"
    analysis = read(root / "analysis.json")
    population = read(root / "population" / "config.json")
    if analysis is None or population is None:
        return None
    barrier = {name: path["barrier"]["barrier_max"] for name, path in analysis["paths"].items()}
    mapped, flat = barrier["mapped (one space, z)"], barrier["mapped, path flattening (z)"]
    one, apart = barrier["plain, one init (weights)"], barrier["plain, independent inits (weights)"]
    starts = barrier["mapped, independent starts (z)"]
    soups = analysis["soups"]
    best = soups["best member (by validation)"]
    uniform, greedy = soups["uniform soup"]["test"], soups["greedy soup"]
    teacher = analysis["distillation"]
    sentences = [
        f"{len(population['members'])} CNN2 classifiers as latents of one mapping "
        f"(`mapnet.ModelSpace`), {population['epochs']} epochs each. The straight path between "
        f"two Fashion-MNIST members dips {mapped:.2f} points below their endpoints; trained "
        f"with path flattening, {flat:.2f}. Both start at z = 0, one plain initialisation: two "
        f"CNN2s trained directly from one init dip {one:.2f} (from independent inits "
        f"{apart:.2f}), so without flattening the space interpolates "
        f"{_than(mapped, one, 'worse', 'better')} than plain weights from one init do. Two "
        f"members from independent random latents dip {starts:.2f}, against {apart:.2f} for "
        "plain CNN2s from independent inits: a shared start connects members "
        f"({mapped:.2f} with one), the shared coordinates "
        f"{_than(starts, mapped, 'alone do not', 'alone do too')}.",
        f"The uniform soup of the {len(soups['members'])} Fashion-MNIST members "
        f"({uniform:.2f} %) {_than(uniform, best['test'], 'beats', 'loses to')} the best member "
        f"({best['test']:.2f}); the greedy soup keeps {listing(greedy['members'])} "
        f"({greedy['test']:.2f}). A latent fitted for {teacher['steps']} steps to a plain "
        f"CNN2's outputs on unlabelled images ({teacher['student_test']:.2f} %) "
        f"{_than(teacher['student_test'], teacher['labels_one_epoch_test'], 'beats', 'trails')} "
        f"one epoch on the labels ({teacher['labels_one_epoch_test']:.2f}).",
    ]
    inr = read(root / "inr" / "summary.json")
    if inr is not None:
        headline = []
        for dataset, entry in inr["datasets"].items():
            chosen = chosen_row(entry)
            pixels = entry["pixels"].get("pixels-full")
            if chosen is None or pixels is None:
                continue
            row = chosen[1]
            headline.append(
                f"{row['test_acc']:.2f} ± {row['test_acc_std']:.2f} % of {DATASET_NAMES[dataset]} "
                f"(d = {row['latent_dim']}; on the pixels {pixels['test_acc']:.2f})"
            )
        sentences.append(
            "One SIREN per image through one mapping, θ₀ and step sizes meta-learned as functa "
            "does (a variant, not the paper's method): an MLP on the latents of the full "
            f"training sets classifies {listing(headline)} test images, d chosen on "
            f"validation; targets: {judged_targets(inr)}."
        )
    speed = read(root / "speed.json")
    if speed is not None:
        cases = [f"{row['case']}: {row['speedup']:.1f}×" for row in speed["rows"]]
        sentences.append(
            f"A vmap forward of {speed['rows'][0]['members']} members against a loop: "
            f"{'; '.join(cases)}."
        )
    return Facts("A model space", "space.md", "mapnet repro space", " ".join(sentences))
