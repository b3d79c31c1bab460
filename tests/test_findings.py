"""findings.md (``hf_vit.findings``): cells of seeds, the paired estimate, the designs' verdicts, the records a study
commits and the exact regeneration of findings.md from them — including the committed CPU study's."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO
from scipy import stats as scipy_stats

from hf_vit.errors import UserError
from hf_vit.findings import (STUDY_RECORD, Design, cells_of, converged, estimate, export_records, judge,
                             last_part_rise, read_facts, write_findings)
from hf_vit.findings.__main__ import main as findings_main
from hf_vit.findings.stats import slope_weights
from hf_vit.predictions import write_predictions

N_TEST = 400


def fake_run(root: Path, name: str, correct: np.ndarray, *, preset: str = "vit_tiny_cifar", fraction: float = 1.0,
             seed: int = 1, train_correct: np.ndarray | None = None, curve=(0.30, 0.40, 0.45, 0.46, 0.46),
             source: str | None = None) -> Path:
    """A finished run folder: all_results.json, train_config.yaml, config.json, log_history.json (a validation
    curve) and predictions_test.csv whose rows are right where ``correct`` says."""
    folder = root / name
    folder.mkdir(parents=True)
    labels = np.arange(len(correct)) % 4
    rows = [(i, f"img/{i}.jpg", int(label), int(label if ok else (label + 1) % 4))
            for i, (label, ok) in enumerate(zip(labels, correct))]
    write_predictions(folder / "predictions_test.csv", rows)
    results = {"test_accuracy": float(np.mean(correct)), "test_samples": len(correct), "epoch": 10.0,
               "global_step": 500, "num_parameters": 1_800_000, "training_flops_per_image": 2e8,
               "train_samples_seen": 64_000, "train_runtime": 60.0}
    if train_correct is not None:
        train_rows = [(i, f"train/{i}.jpg", 0, 0 if ok else 1) for i, ok in enumerate(train_correct)]
        write_predictions(folder / "predictions_train_eval.csv", train_rows)
        results["train_eval_accuracy"] = float(np.mean(train_correct))
    (folder / "all_results.json").write_text(json.dumps(results))
    (folder / "train_config.yaml").write_text(yaml.safe_dump({
        "model_preset": None if source else preset, "model_name_or_path": source, "dataset_name": "/x/data/split",
        "train_fraction": fraction, "eval_split": "validation", "test_split": "test", "seed": seed,
        "output_dir": str(folder)}))
    (folder / "config.json").write_text(json.dumps({"model_type": "resnet" if preset.startswith("cnn") else "vit"}))
    steps = np.linspace(100, 500, len(curve)).astype(int)
    (folder / "log_history.json").write_text(json.dumps(
        [{"step": int(s), "epoch": s / 50, "eval_accuracy": a} for s, a in zip(steps, curve)]))
    return folder


def write_record(root: Path, runs: list[tuple[str, str, int]], designs: list[dict]) -> None:
    (root / STUDY_RECORD).write_text(json.dumps({
        "title": "test study", "description": "", "study_path": "studies/x.yaml", "findings": designs,
        "runs": [{"name": name, "cell": cell, "seed": seed, "command": f"python run_finetune.py --seed {seed}"}
                 for name, cell, seed in runs]}))


def correctness(rng: np.random.Generator, accuracy: float, shared: np.ndarray | None = None,
                flip: float = 0.0) -> np.ndarray:
    """Right/wrong per test image with about ``accuracy``; with ``shared``, a copy of it with a ``flip`` share of the
    images redrawn (two models that find the same images hard)."""
    if shared is None:
        return rng.random(N_TEST) < accuracy
    redraw = rng.random(N_TEST) < flip
    return np.where(redraw, rng.random(N_TEST) < accuracy, shared)


def two_cells(root: Path, a: list[float], b: list[float], paired: bool = True, **kwargs) -> dict:
    """Cells ``a`` and ``b`` with one run per listed accuracy; with ``paired`` their runs share most right/wrong
    images."""
    rng = np.random.default_rng(0)
    base = correctness(rng, 0.5)
    runs = []
    for cell, accuracies in (("a", a), ("b", b)):
        for seed, accuracy in enumerate(accuracies, 1):
            correct = correctness(rng, accuracy, base if paired else None, flip=0.2)
            # Exactly the wanted accuracy: turn the first wrong (or right) images until it matches.
            need = round(accuracy * N_TEST) - int(correct.sum())
            order = np.flatnonzero(~correct if need > 0 else correct)[:abs(need)]
            correct[order] = need > 0
            fake_run(root, f"{cell}_s{seed}", correct, seed=seed, **kwargs)
            runs.append((f"{cell}_s{seed}", cell, seed))
    return {"runs": runs}


def cells_in(root: Path, runs) -> dict:
    return cells_of(read_facts([(name, root / name) for name, _, _ in runs],
                               cells={name: (cell, seed) for name, cell, seed in runs}))


DIFFERENCE = Design(title="a beats b", report="r", hypothesis="h", kind="difference", pairs=[("a", "b")])


# ------------------------------------------------------------------------------------------------ the estimate
def test_a_cell_is_the_mean_of_its_seeds_with_their_spread_never_the_best_run(tmp_path):
    made = two_cells(tmp_path, [0.60, 0.64, 0.62], [0.50, 0.51, 0.52])
    cells = cells_in(tmp_path, made["runs"])
    found = estimate([("a", "test", 1.0), ("b", "test", -1.0)], cells)
    per_seed = [100 * (x - y) for x, y in zip([0.60, 0.64, 0.62], [0.50, 0.51, 0.52])]
    assert found.value == pytest.approx(statistics.fmean(per_seed))  # 11.0, not the best run's 14
    assert found.se_seeds == pytest.approx(statistics.stdev(per_seed) / math.sqrt(3))
    assert found.seeds == 3 and found.images == N_TEST
    low, high = found.interval
    df = 2 * (found.se / found.se_seeds) ** 4  # Welch-Satterthwaite: 2 when the seeds' spread were all the error
    assert found.degrees_of_freedom == pytest.approx(df) and df > 2
    assert high - low == pytest.approx(2 * scipy_stats.t.ppf(0.975, df) * found.se, rel=1e-9)


def test_the_paired_bootstrap_is_tighter_when_both_cells_find_the_same_images_hard(tmp_path):
    paired = cells_in(tmp_path / "p", two_cells(tmp_path / "p", [0.6], [0.5], paired=True)["runs"])
    unpaired = cells_in(tmp_path / "u", two_cells(tmp_path / "u", [0.6], [0.5], paired=False)["runs"])
    terms = [("a", "test", 1.0), ("b", "test", -1.0)]
    tight, loose = estimate(terms, paired), estimate(terms, unpaired)
    assert tight.value == pytest.approx(10.0) and loose.value == pytest.approx(10.0)
    # Unpaired, the SE of a difference of two accuracies near 0.55 on 400 images is ~3.5 points.
    assert loose.se_examples == pytest.approx(100 * math.sqrt(0.6 * 0.4 / N_TEST + 0.5 * 0.5 / N_TEST), rel=0.15)
    assert tight.se_examples < 0.75 * loose.se_examples
    # Deterministic: the bootstrap's seed is fixed, so findings.md regenerates byte for byte.
    assert estimate(terms, paired).se_examples == tight.se_examples


def test_sets_scored_on_other_images_are_not_paired(tmp_path):
    made = two_cells(tmp_path, [0.6], [0.5])
    rows = (tmp_path / "b_s1" / "predictions_test.csv").read_text().replace("img/", "other/")
    (tmp_path / "b_s1" / "predictions_test.csv").write_text(rows)
    cells = cells_in(tmp_path, made["runs"])
    assert cells["a"][0].scored["test"].fingerprint != cells["b"][0].scored["test"].fingerprint
    found = estimate([("a", "test", 1.0), ("b", "test", -1.0)], cells)
    assert found.images == 2 * N_TEST  # two independent sets, each resampled on its own


def test_slope_weights_give_the_least_squares_slope():
    xs = [math.log2(f) for f in (0.01, 0.02, 0.04, 0.08)]
    ys = [3.0 + 1.5 * x for x in xs]
    assert sum(w * y for w, y in zip(slope_weights(xs), ys)) == pytest.approx(1.5)


def test_the_convergence_rule_reads_the_seed_mean_validation_curve_over_the_last_fifth(tmp_path):
    rising = (0.30, 0.40, 0.45, 0.47, 0.49)  # steps 100..500: from step 400 (0.47) to 500 (0.49): +2 points
    made = two_cells(tmp_path, [0.6, 0.6, 0.6], [0.5, 0.5, 0.5], curve=rising)
    cells = cells_in(tmp_path, made["runs"])
    assert last_part_rise(cells["a"]) == pytest.approx(2.0)
    assert not converged(cells["a"])


def test_a_rise_of_exactly_the_rules_threshold_is_not_more_than_it(tmp_path):
    # 0.5725 - 0.5625 is 1.0000000000000009 points in floating point: the rule says "more than 1 point".
    made = two_cells(tmp_path, [0.6, 0.6, 0.6], [0.5, 0.5, 0.5], curve=(0.3, 0.5, 0.55, 0.5625, 0.5725))
    cells = cells_in(tmp_path, made["runs"])
    assert last_part_rise(cells["a"]) > 1.0 and converged(cells["a"])


# ------------------------------------------------------------------------------------------------ the verdicts
@pytest.mark.parametrize("a, b, min_effect, expected", [
    ([0.60, 0.62, 0.61], [0.50, 0.51, 0.50], 0, "supported"),
    ([0.50, 0.51, 0.50], [0.60, 0.62, 0.61], 0, "contradicted"),
    ([0.55, 0.50, 0.60], [0.54, 0.56, 0.52], 0, "inconclusive"),
    ([0.60, 0.62, 0.61], [0.50, 0.51, 0.50], 30, "contradicted"),  # the effect is reliably below the minimum
    ([0.60, 0.62], [0.50, 0.51], 0, "not tested in this regime (fewer than 3 seeds"),
])
def test_a_difference_is_judged_by_its_interval_against_the_designs_minimum_effect(tmp_path, a, b, min_effect,
                                                                                  expected):
    cells = cells_in(tmp_path, two_cells(tmp_path, a, b)["runs"])
    design = Design(**{**DIFFERENCE.to_dict(), "pairs": [("a", "b")], "min_effect": min_effect})
    (comparison,) = judge(design, cells)
    assert comparison.verdict.startswith(expected)
    assert comparison.estimate is not None  # the numbers are shown even when not tested


def test_a_cell_still_rising_is_not_tested_in_this_regime_unless_the_design_waives_convergence(tmp_path):
    made = two_cells(tmp_path, [0.60, 0.62, 0.61], [0.50, 0.51, 0.50], curve=(0.3, 0.4, 0.45, 0.47, 0.49))
    cells = cells_in(tmp_path, made["runs"])
    (comparison,) = judge(DIFFERENCE, cells)
    assert comparison.verdict.startswith("not tested in this regime (still rising")
    assert "`a` +2.00" in comparison.verdict
    waived = Design(**{**DIFFERENCE.to_dict(), "pairs": [("a", "b")], "converged": False})
    assert judge(waived, cells)[0].verdict == "supported"


def test_a_slope_design_regresses_the_pairs_differences_on_log2_of_the_fraction(tmp_path):
    order = np.random.default_rng(1).permutation(N_TEST)  # the same hard images for every model: paired
    runs = []
    for fraction, vit, cnn in ((0.01, 0.30, 0.45), (0.02, 0.36, 0.48), (0.04, 0.42, 0.51), (0.08, 0.48, 0.54)):
        for family, accuracy in (("vit", vit), ("cnn", cnn)):
            cell = f"{family}_{fraction}"
            for seed in (1, 2, 3):
                correct = np.zeros(N_TEST, dtype=bool)
                correct[order[:round(accuracy * N_TEST) + seed - 2]] = True
                name = f"{cell}_s{seed}"
                fake_run(tmp_path, name, correct, seed=seed, fraction=fraction,
                         preset="vit_tiny_cifar" if family == "vit" else "cnn_tiny_cifar")
                runs.append((name, cell, seed))
    design = Design(title="t", report="r", hypothesis="h", kind="slope",
                    pairs=[(f"vit_{f}", f"cnn_{f}") for f in (0.01, 0.02, 0.04, 0.08)])
    (comparison,) = judge(design, cells_in(tmp_path, runs))
    # ViT - CNN: -15, -12, -9, -6 points: +3 points per doubling.
    assert comparison.estimate.value == pytest.approx(3.0, abs=1e-9)
    assert comparison.verdict == "supported", comparison.line()
    assert comparison.unit == "points per doubling"


def test_a_gap_design_compares_the_final_weights_on_training_images_with_the_test_set(tmp_path):
    rng = np.random.default_rng(2)
    runs = []
    for seed in (1, 2, 3):
        fake_run(tmp_path, f"v_s{seed}", rng.random(N_TEST) < 0.5, seed=seed,
                 train_correct=rng.random(N_TEST) < 0.9)
        runs.append((f"v_s{seed}", "v", seed))
    cells = cells_in(tmp_path, runs)
    gap = Design(title="t", report="r", hypothesis="h", kind="gap", cells=["v"], min_effect=5)
    (comparison,) = judge(gap, cells)
    assert comparison.estimate.value == pytest.approx(
        statistics.fmean(100 * (r.accuracy("train_eval") - r.accuracy("test")) for r in cells["v"]))
    assert comparison.estimate.images == 2 * N_TEST and comparison.verdict == "supported"
    assert judge(Design(**{**gap.to_dict(), "min_effect": 60.0}), cells)[0].verdict == "contradicted"


# ------------------------------------------------------------------------------------------ records, regeneration
def test_findings_regenerate_exactly_from_the_exported_records_alone(tmp_path):
    study = tmp_path / "study"
    made = two_cells(study, [0.60, 0.62, 0.61], [0.50, 0.51, 0.50])
    for name, _, _ in made["runs"]:  # what a real run folder holds beside its records
        (study / name / "model.safetensors").write_bytes(b"weights")
    write_record(study, made["runs"] + [("c_s1", "c", 1)], [DIFFERENCE.to_dict()])
    first = write_findings(study).read_text()
    assert "1. a beats b: **supported**" in first and "not finished: c_s1" in first

    records = tmp_path / "records"
    findings_main([str(study), "--export_records", str(records)])
    assert sorted(p.name for p in (records / "a_s1").iterdir()) == [
        "all_results.json", "config.json", "log_history.json", "predictions_test.csv.gz", "train_config.yaml"]
    assert (records / "findings.md").read_text() == first
    # The records can lie anywhere: moved, they still give the same bytes.
    shutil.move(str(records), str(tmp_path / "moved"))
    findings_main([str(tmp_path / "moved")])
    assert (tmp_path / "moved" / "findings.md").read_text() == first


def test_a_folder_without_a_study_record_is_a_one_line_error(tmp_path):
    with pytest.raises(UserError, match="has no study.json"):
        write_findings(tmp_path)


def test_the_committed_cpu_findings_are_exactly_what_their_records_regenerate(tmp_path):
    committed = REPO / "docs" / "findings"
    if not (committed / STUDY_RECORD).is_file():
        pytest.fail("docs/findings/ holds no study.json: commit the CPU study's records (python -m hf_vit.findings "
                    "outputs/cpu_findings --export_records docs/findings)")
    shutil.copytree(committed, tmp_path / "records", ignore=shutil.ignore_patterns("*.png", "findings.md"))
    regenerated = write_findings(tmp_path / "records").read_text()
    assert regenerated == (committed / "findings.md").read_text()


# ------------------------------------------------------------------------------------------------ the designs
@pytest.mark.parametrize("designs, message", [
    ({"x": 1}, "findings must be a list"),
    ([{"title": "t", "report": "r", "hypothesis": "h", "kind": "ratio", "pairs": [["a", "b"]]}], "kind must be"),
    ([{"title": "t", "report": "r", "hypothesis": "h", "kind": "difference", "pairs": [["a", "zz"]]}],
     "'zz' is not a cell"),
    ([{"title": "t", "report": "r", "hypothesis": "h", "kind": "slope", "pairs": [["a", "b"]]}], "at least 3"),
    ([{"title": "t", "report": "r", "hypothesis": "h", "kind": "gap", "pairs": [["a", "b"]]}], "a gap design"),
    ([{"title": "t", "report": "r", "kind": "difference", "pairs": [["a", "b"]]}], "hypothesis must be"),
    ([{"title": "t", "report": "r", "hypothesis": "h", "kind": "difference", "pairs": [["a", "b"]], "typo": 1}],
     "unknown key 'typo'"),
])
def test_a_mistake_in_a_design_is_a_one_line_error_before_anything_runs(tmp_path, designs, message):
    from hf_vit.study_file import load_study

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"defaults": {"dataset_name": "/data/x", "model_preset": "vit_tiny_cifar"},
                                    "runs": [{"name": "a", "seeds": [1, 2, 3]}, {"name": "b"}],
                                    "findings": designs}))
    with pytest.raises(UserError, match=message) as error:
        load_study(str(path), str(tmp_path / "out"))
    assert "\n" not in str(error.value)


def test_seeds_expand_a_run_into_one_cell_and_the_committed_study_states_its_four_designs(tmp_path):
    from hf_vit.study_file import load_study

    study = load_study(str(REPO / "studies" / "cifar10_cpu_findings.yaml"), str(tmp_path / "out"))
    cells = {}
    for run in study.runs:
        cells.setdefault(run.cell, []).append((run.name, run.flags.get("seed")))
    assert cells["vit_f8"] == [("vit_f8_s1", "1"), ("vit_f8_s2", "2"), ("vit_f8_s3", "3")]
    assert [d.kind for d in study.findings] == ["difference", "slope", "difference", "gap"]
    slope = study.findings[1]
    assert len(slope.pairs) >= 4 and all(len(cells[c]) >= 3 for pair in slope.pairs for c in pair)
    assert all(len(cells[c]) >= 3 for d in study.findings for c in d.all_cells())
    assert study.findings[3].min_effect > 0


# ------------------------------------------------------------------------------------------------ hostile records
def run_findings(argv: list[str], capsys) -> tuple[int, str]:
    from hf_vit.errors import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(findings_main, argv)
    return exit_info.value.code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("content", [b"garbage\n", b"index,key,label,prediction\n0,a,1\n",
                                     b"index,key,label,prediction\n0,a,one,1\n", b"\x1f\x8b\x08broken"])
def test_a_corrupt_predictions_file_is_a_one_line_error_and_nothing_is_written(tmp_path, capsys, content):
    made = two_cells(tmp_path / "study", [0.6], [0.5])
    write_record(tmp_path / "study", made["runs"], [])
    (tmp_path / "study" / "a_s1" / "predictions_test.csv").unlink()
    (tmp_path / "study" / "a_s1" / "predictions_test.csv.gz").write_bytes(content)
    code, err = run_findings([str(tmp_path / "study"), "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert "predictions_test.csv.gz" in err and not (tmp_path / "out").exists()


def test_a_full_disk_while_exporting_records_is_one_line_and_leaves_no_half_run(tmp_path, capsys, monkeypatch):
    import errno

    import hf_vit.findings.records as records

    made = two_cells(tmp_path / "study", [0.6], [0.5])
    write_record(tmp_path / "study", made["runs"], [])
    copies, copy = [], shutil.copyfile

    def copy_until_full(source, target):
        if len(copies) == 4:  # the first run's four record files, then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        copies.append(target)
        return copy(source, target)

    monkeypatch.setattr(records.shutil, "copyfile", copy_until_full)
    code, err = run_findings([str(tmp_path / "study"), "--export_records", str(tmp_path / "rec")], capsys)
    assert code == 2 and err.startswith("error: no space left") and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in (tmp_path / "rec").iterdir() if not p.name.startswith(".")) == ["a_s1"]
