"""Choose the classifier-free guidance scale on the real validation split, for the utility a release is judged by.

Guidance trades diversity for class fidelity: at 2.5 the demo model's images were recognised perfectly by a
real-trained classifier (TRTS 1.00) yet a classifier trained on them did worse on real patients (TSTR balanced
accuracy 0.81 against 0.89 at 1.0). So the scale is chosen for the objective the gate judges, measured the way the
audit measures it, but on data the audit never scores:

    for each candidate scale g: generate `per_class` images of every class (seeds disjoint from the release's),
    train the audit classifier on them (checkpoint chosen on real val, as in TSTR), score it on real val;
    choose the g with the best balanced accuracy (its worst-class sensitivity breaks near-ties; then the smaller g);
    while the largest scale tried is the choice, try the next of `extend`, so that the grid's edge is not taken for
    the optimum (HAM10000 after 400 steps scored 0.23 / 0.30 / 0.34 on val at 1 / 2 / 3, still rising; on its
    test split scale 5 against 3 was within the intervals either way: benchmarks/README.md). A choice inside the
    grid costs nothing more.

Which weights: a model that kept EMA snapshots during training (`train.snapshot_every`, the `quality` preset)
offers them beside its final EMA weights, because more training is not always better (PneumoniaMNIST: TSTR ratio
0.96 after 400 steps, 0.77 after 800; HAM10000: 0.64 -> 0.76). Every kept weights is scored first at
`snapshot_scale` (one candidate each, the same objective); the grid of scales above then runs on the winner only
(near-ties go to the later step). That costs one candidate per snapshot instead of a grid per snapshot.

With a TRTS floor (`trts_floor`; a release takes it from its policy's `min_trts_balanced_accuracy`), a classifier
trained once on the real train split (checkpoint on real val, as the audit's TRTR) also scores each candidate's
images: the balanced accuracy with which it recognises the class each was generated for (TRTS on generated, not
test, images), and its own val balanced accuracy (TRTR on val) turns each candidate's TSTR into a TSTR/TRTR ratio.
Candidates that pass what the gate judges (TRTS ≥ the floor and, with `ratio_floor`, the policy's
`min_tstr_trtr_balanced_accuracy_ratio`, the ratio ≥ it) are chosen among as above. When none passes, the one
closest to passing: the best min(TRTS / floor, ratio / ratio_floor), so that neither rule is given up for the
other (the gate blocks such a release either way; the steward then sees the least-failing one). Without a floor
the objective is TSTR alone: a DP release at ε = 10 chose scale 2 for TSTR and was blocked at TRTS 0.57, although
guidance is the lever that trades diversity for class fidelity.

The real test split is never touched. Output: one atomic directory with `guidance.json` (kind
"guidance_selection": every candidate's scores, the chosen scale, the objective), read through `GuidanceSelection`
(`load_guidance`); the generation stage reads the chosen scale from it, and the dataset card and datasheet report it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from reports.classifier import ClassifierConfig, torch_threads, train_classifier
from reports.metrics import classification_metrics
from synth import layout
from synth.artifacts import atomic_dir, write_header
from synth.data.canonical import load_dataset
from synth.errors import InputError, where
from synth.header_schema import HeaderModel, load_header

KIND = "guidance_selection"
SCHEMA_VERSION = 1
HEADER = layout.GUIDANCE_HEADER
# Scores closer than this are a tie (the validation split's sampling noise is larger): prefer less guidance,
# which keeps more diversity.
TIE = 0.005


class GuidanceSelectionConfig(BaseModel):
    """How the guidance scale is chosen (written into the artifact's header)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    candidates: tuple[float, ...] = Field((1.0, 2.0, 3.0), description="guidance scales tried (1 = none)")
    extend: tuple[float, ...] = Field((5.0,), description="larger scales tried in turn while the largest scale "
                                                          "tried so far is the choice")
    per_class: int = Field(100, ge=10, le=100_000, description="images generated per class and candidate")
    snapshot_scale: float = Field(2.0, ge=0, le=50, description="the scale every kept weights (EMA snapshots and "
                                                                "the final EMA) is compared at")
    # Seeds disjoint from the release's (seed 0): the chosen scale is not fitted to the released images.
    seed: int = Field(1_000_003, ge=0)
    # The audit's classifier with smaller batches: a few hundred images still give it its minimum steps in a few
    # dozen epochs (each epoch is scored on real val).
    classifier: ClassifierConfig = ClassifierConfig(threads=1, batch_size=32)
    trts_floor: float | None = Field(None, ge=0, le=1, description="least TRTS balanced accuracy a choice should "
                                     "have (see the module docstring); None: TSTR alone")
    ratio_floor: float | None = Field(None, ge=0, description="least TSTR/TRTR balanced-accuracy ratio (on val) "
                                      "a choice should have; used only with trts_floor")
    real_per_class: int = Field(1000, ge=10, description="real train images per class for the TRTS classifier")
    # The TRTS judge: the audit's own classifier settings (its TRTR), trained once per selection.
    real_classifier: ClassifierConfig = ClassifierConfig(threads=1)

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("candidates must list at least one guidance scale")
        if any(not np.isfinite(g) or g < 0 or g > 50 for g in v):
            raise ValueError(f"guidance scales must be in [0, 50], got {list(v)}")
        return tuple(sorted(set(v)))

    @field_validator("extend")
    @classmethod
    def _extend(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not np.isfinite(g) or g < 0 or g > 50 for g in v):
            raise ValueError(f"guidance scales must be in [0, 50], got extend {list(v)}")
        return tuple(sorted(set(v)))

    def extension(self, tried: dict[float, Any]) -> float | None:
        """The next scale of `extend` to try given the scores so far, or None: only while the largest scale tried
        is the choice."""
        if not tried or choose(tried, floor=self.trts_floor, ratio_floor=self.ratio_floor) != max(tried):
            return None
        return next((g for g in self.extend if g > max(tried)), None)


def _score(images: np.ndarray, labels: np.ndarray, val_images: np.ndarray, val_labels: np.ndarray,
           class_names: list[str], cfg: GuidanceSelectionConfig) -> dict[str, Any]:
    clf = train_classifier(images, labels, val_images, val_labels, config=cfg.classifier,
                           num_classes=len(class_names))
    m = classification_metrics(val_labels, clf.predict_proba(val_images), class_names=class_names, n_boot=0)
    return {"balanced_accuracy": m["balanced_accuracy"]["value"],
            "worst_class_sensitivity": m["worst_class_sensitivity"]["value"], "worst_class": m["worst_class"],
            "auroc": m["auroc"]["value"]}


def _margin(score: dict[str, Any], floor: float, ratio_floor: float | None) -> float:
    """How far a candidate is from failing the gate's utility floors: min(TRTS / floor, ratio / ratio_floor) (≥ 1:
    it passes both; a missing ratio is left out)."""
    margins = [(score.get("trts_balanced_accuracy") or 0.0) / max(floor, 1e-9)]
    ratio = score.get("tstr_trtr_ratio")
    if ratio_floor is not None and ratio is not None:
        margins.append(ratio / max(ratio_floor, 1e-9))
    return min(margins)


def _meeting(scores: dict[Any, dict[str, Any]], floor: float | None,
             ratio_floor: float | None = None) -> dict[Any, dict[str, Any]]:
    """The candidates that pass the floors (TRTS ≥ `floor`, TSTR/TRTR ratio ≥ `ratio_floor`); when none does, the
    one(s) closest to passing (the best `_margin`, within `TIE`)."""
    if floor is None:
        return scores
    margin = {k: _margin(s, floor, ratio_floor) for k, s in scores.items()}
    passing = {k: s for k, s in scores.items() if margin[k] >= 1.0}
    if passing:
        return passing
    top = max(margin.values())
    return {k: s for k, s in scores.items() if margin[k] >= top - TIE}


def choose(scores: dict[float, dict[str, Any]], *, floor: float | None = None,
           ratio_floor: float | None = None) -> float:
    """The scale with the best balanced accuracy; within `TIE` of it, the best worst-class sensitivity, then the
    smallest scale. With `floor`, only among the scales that pass the floors, or are closest to (`_meeting`)."""
    scores = _meeting(scores, floor, ratio_floor)
    best = max(s["balanced_accuracy"] or 0.0 for s in scores.values())
    near = [g for g, s in scores.items() if (s["balanced_accuracy"] or 0.0) >= best - TIE]
    top = max(scores[g]["worst_class_sensitivity"] or 0.0 for g in near)
    return min(g for g in near if (scores[g]["worst_class_sensitivity"] or 0.0) >= top - TIE)


def weights_step(weights: str, final_step: int) -> int:
    """The training step of a weights name: STEP for "ema@STEP", the final step for "ema" (and "raw")."""
    return int(weights.partition("@")[2]) if "@" in weights else int(final_step)


def choose_weights(scores: dict[str, dict[str, Any]], steps: dict[str, int], *, floor: float | None = None,
                   ratio_floor: float | None = None) -> str:
    """The weights with the best balanced accuracy; within `TIE` of it, the best worst-class sensitivity, then the
    latest step (the most trained of equals). With `floor`, only among those that pass the floors (`_meeting`)."""
    scores = _meeting(scores, floor, ratio_floor)
    best = max(s["balanced_accuracy"] or 0.0 for s in scores.values())
    near = [w for w, s in scores.items() if (s["balanced_accuracy"] or 0.0) >= best - TIE]
    top = max(scores[w]["worst_class_sensitivity"] or 0.0 for w in near)
    return max((w for w in near if (scores[w]["worst_class_sensitivity"] or 0.0) >= top - TIE), key=steps.__getitem__)


def select_guidance(
    dataset_dir: Path,
    model_dir: Path,
    out: Path,
    *,
    sampler: str,
    steps: int | None = None,
    config: GuidanceSelectionConfig | None = None,
    device: str = "auto",
    batch_size: int = 64,
    weights: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Choose the weights and the guidance scale of `model_dir` on the real validation split (see the module
    docstring) and write the choice atomically to `out`. `weights`: the weights names to choose among (default:
    the final EMA weights and every EMA snapshot the model kept); one name: only the scale is chosen.

    Raises `InputError` when the real set has no validation split or `out` exists.
    """
    from synth.generate import generate
    from synth.pipeline import read_model_card, snapshot_weights

    cfg = config or GuidanceSelectionConfig()
    out, say = Path(out), progress or (lambda _msg: None)
    if out.exists():
        raise InputError(where(out, "already exists; choose another output or remove it"))
    real = load_dataset(Path(dataset_dir))
    val_images, val_meta = real.split("val")
    if len(val_meta) == 0:
        raise InputError(where(dataset_dir, "has no validation split to choose the guidance scale on"))
    val_labels = val_meta["label"].to_numpy(dtype=np.int64)
    names = list(real.class_names)
    card = read_model_card(Path(model_dir))
    final_step = int(card.get("steps") or 0)
    offered = list(weights) if weights else ["ema", *snapshot_weights(card)]
    step_of = {w: weights_step(w, final_step) for w in offered}
    by_weights: dict[str, dict[str, Any]] = {}
    scores: dict[float, dict[str, Any]] = {}
    real_clf, trtr_val = None, None
    if cfg.trts_floor is not None:
        say(f"training a classifier on the real train split (≤ {cfg.real_per_class} per class) for TRTS")
        real_clf = _real_classifier(real, val_images, val_labels, names, cfg)
        trtr_val = classification_metrics(val_labels, real_clf.predict_proba(np.asarray(val_images)),
                                          class_names=names, n_boot=0)["balanced_accuracy"]["value"]
    with tempfile.TemporaryDirectory(prefix="synthgate-guidance-") as tmp:

        def score(w: str, g: float) -> dict[str, Any]:
            name = f"{w} guidance {g:g}" if len(offered) > 1 else f"guidance {g:g}"
            say(f"{name}: generating {cfg.per_class} images per class, training a classifier on them")
            syn = generate(Path(model_dir), Path(tmp) / f"{w.replace('@', '-')}-g{g:g}",
                           per_class=dict.fromkeys(names, cfg.per_class), sampler=sampler, steps=steps,
                           guidance_scale=g, batch_size=batch_size, seed=cfg.seed, device=device, weights=w,
                           progress=False)
            ds = load_dataset(syn)
            with torch_threads(cfg.classifier.threads):
                syn_images, syn_labels = np.asarray(ds.images), ds.metadata["label"].to_numpy(dtype=np.int64)
                result = _score(syn_images, syn_labels, np.asarray(val_images), val_labels, names, cfg)
                if real_clf is not None:
                    trts = classification_metrics(syn_labels, real_clf.predict_proba(syn_images),
                                                  class_names=names, n_boot=0)
                    result["trts_balanced_accuracy"] = trts["balanced_accuracy"]["value"]
                    if trtr_val:
                        result["tstr_trtr_ratio"] = result["balanced_accuracy"] / trtr_val
            say(f"{name}: validation balanced accuracy {result['balanced_accuracy']:.3f}"
                + (f", TRTS {result['trts_balanced_accuracy']:.3f}" if real_clf is not None else ""))
            return result

        if len(offered) > 1:
            for w in sorted(offered, key=step_of.__getitem__):
                by_weights[w] = score(w, cfg.snapshot_scale)
        floors = {"floor": cfg.trts_floor, "ratio_floor": cfg.ratio_floor}
        chosen_weights = choose_weights(by_weights, step_of, **floors) if by_weights else offered[0]
        if by_weights:
            scores[cfg.snapshot_scale] = by_weights[chosen_weights]
        queue: list[float] = [g for g in cfg.candidates if g not in scores]
        while queue:
            g = queue.pop(0)
            scores[g] = score(chosen_weights, g)
            if not queue and (nxt := cfg.extension(scores)) is not None:
                queue.append(nxt)
    chosen = choose(scores, **floors)
    floor_text = ("" if cfg.trts_floor is None else
                  f"; only among candidates whose images a real-trained classifier recognises with balanced "
                  f"accuracy ≥ {cfg.trts_floor:g} (TRTS floor)"
                  + ("" if cfg.ratio_floor is None else f" and whose TSTR/TRTR ratio on val is ≥ {cfg.ratio_floor:g}")
                  + "; when none does, the one closest to passing (best min(TRTS/floor, ratio/floor))")
    body = {
        "guidance_scale": chosen,
        "weights": chosen_weights,
        "weights_step": step_of[chosen_weights],
        "objective": "balanced accuracy on the real validation split of a classifier trained on generated "
                     "images (worst-class sensitivity breaks ties, then the smaller scale; larger scales are "
                     "tried while the largest tried wins; with EMA snapshots, each weights is compared at "
                     f"scale {cfg.snapshot_scale:g} first, near-ties going to the later step){floor_text}",
        "trts_floor": cfg.trts_floor,
        "ratio_floor": cfg.ratio_floor,
        "trtr_val_balanced_accuracy": trtr_val,
        "weights_candidates": [{"weights": w, "step": step_of[w], "guidance_scale": cfg.snapshot_scale, **s}
                               for w, s in by_weights.items()],
        "candidates": [{"guidance_scale": g, **s} for g, s in sorted(scores.items())],
        "sampler": sampler,
        "steps": steps,
        "real_val_images": len(val_labels),
    }
    with atomic_dir(out) as tmp_out:
        write_header(tmp_out, HEADER, kind=KIND, schema_version=SCHEMA_VERSION, files=[],
                     inputs={"dataset": real.content_hash, "model": str(card["content_hash"])},
                     config=cfg.model_dump(mode="json"), body=body)
    return out


def _real_classifier(real: Any, val_images: Any, val_labels: np.ndarray, names: list[str],
                     cfg: GuidanceSelectionConfig) -> Any:
    """The audit's classifier trained on (up to `real_per_class` per class of) the real train split, checkpoint on
    real val: the TRTS judge for the candidates."""
    images, meta = real.split("train")
    labels = meta["label"].to_numpy(dtype=np.int64)
    rng = np.random.default_rng(cfg.seed)
    keep = np.sort(np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[: cfg.real_per_class] for c in range(len(names))]))
    with torch_threads(cfg.real_classifier.threads):
        return train_classifier(np.asarray(images)[keep], labels[keep], np.asarray(val_images), val_labels,
                                config=cfg.real_classifier, num_classes=len(names))


class GuidanceCandidate(BaseModel):
    """One tried scale and its validation scores (`_score`; None where a metric was undefined)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    guidance_scale: float
    balanced_accuracy: float | None = None
    worst_class_sensitivity: float | None = None
    worst_class: str | None = None
    auroc: float | None = None
    trts_balanced_accuracy: float | None = None  # with a TRTS floor: the real-trained classifier on these images
    tstr_trtr_ratio: float | None = None  # with a TRTS floor: balanced_accuracy / the real classifier's on val


class WeightsCandidate(GuidanceCandidate):
    """One offered weights (final EMA or an EMA snapshot) and its validation scores at the comparison scale."""

    weights: str
    step: int


class GuidanceSelection(HeaderModel):
    """A guidance selection's header (`guidance.json`): the chosen weights and scale, how they were chosen, every
    candidate."""

    guidance_scale: float
    weights: str = "ema"
    weights_step: int | None = None
    objective: str = ""
    trts_floor: float | None = None
    ratio_floor: float | None = None
    trtr_val_balanced_accuracy: float | None = None
    candidates: list[GuidanceCandidate] = Field(default_factory=list)
    weights_candidates: list[WeightsCandidate] = Field(default_factory=list)
    sampler: str | None = None
    steps: int | None = None
    real_val_images: int | None = None

    def facts(self) -> dict[str, Any]:
        """What the release documents say about the selection: the choice, the objective, each candidate's
        scores on the gate's utility metrics."""
        keep = {"guidance_scale", "balanced_accuracy", "worst_class_sensitivity", "trts_balanced_accuracy"}
        return {"guidance_scale": self.guidance_scale, "weights": self.weights, "weights_step": self.weights_step,
                "objective": self.objective, "trts_floor": self.trts_floor, "ratio_floor": self.ratio_floor,
                "candidates": [c.model_dump(include=keep) for c in self.candidates],
                "weights_candidates": [c.model_dump(include={"weights", "step", *keep})
                                       for c in self.weights_candidates]}


def read_guidance(root: Path) -> dict[str, Any]:
    """The selection's header as written (checked against `GuidanceSelection`); `["guidance_scale"]` is the
    chosen scale."""
    return load_header(GuidanceSelection, Path(root), HEADER, kind=KIND, what="guidance selection header")[0]


def load_guidance(root: Path) -> GuidanceSelection:
    """The typed header of a guidance selection directory (one-line InputError naming the file when malformed)."""
    return load_header(GuidanceSelection, Path(root), HEADER, kind=KIND, what="guidance selection header")[1]
