"""Command line: parse arguments, load a config, call one pipeline function.

Errors caused by the user's input (:class:`ReadingRaceError`) are printed as one clear message,
without a traceback, and the command exits with status 2.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from readingrace.errors import ConfigError, ReadingRaceError, is_interruption

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="readingrace: do imaging models read race, sex or age? Reproduce the 'Reading Race' study.")

DataRoot = Annotated[Optional[Path], typer.Option("--data-root", help="folder holding the source's files")]
Out = Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: runs/<name>, or the config's out)")]
DemoOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: runs/demo)")]
CohortOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: runs/<name>/cohort)")]
EvalOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: evaluation/ beside the "
                                                                    "predictions file)")]
ConfoundersOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: "
                                                                            "runs/<name>/confounders)")]
PredictOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: "
                                                                        "RUN_DIR/external/<cohort name>)")]
ProbeOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="output folder (default: runs/<name>/probe)")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", help="override a config key: --set train.max_epochs=3")]


def _overrides(sets: list[str] | None) -> dict:
    from readingrace.config import set_dotted

    out: dict = {}
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE, e.g. --set train.max_epochs=3")
        key, value = item.split("=", 1)
        set_dotted(out, key.strip(), yaml.safe_load(value))
    return out


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


@app.command()
def run(config: Annotated[Path, typer.Argument(help="experiment YAML")], data_root: DataRoot = None,
        out: Out = None, force: Annotated[bool, typer.Option(help="redo a finished run in the same folder")] = False,
        set_: Sets = None, progress: Annotated[bool, typer.Option(help="show a progress bar")] = False) -> None:
    """Train and evaluate one experiment: cohort -> split -> cache -> train -> evaluate -> report."""
    from readingrace.config import load_config
    from readingrace.experiments.run import run_experiment

    cfg = load_config(config, overrides=_overrides(set_))
    metrics = run_experiment(cfg, out=out, data_root=data_root, force=force, progress=progress, say=_say)
    _print_summary(metrics)


@app.command()
def demo(out: DemoOut = None, force: Annotated[bool, typer.Option(help="redo a finished run")] = False,
         set_: Sets = None) -> None:
    """Run the embedded default: a generated cohort (3 groups, planted texture signal)."""
    from readingrace.config import load_config
    from readingrace.experiments.run import run_experiment

    path = resources.files("readingrace") / "configs" / "demo.yaml"
    with resources.as_file(path) as p:
        cfg = load_config(p, overrides=_overrides(set_))
    metrics = run_experiment(cfg, out=out or Path("runs") / "demo", force=force, say=_say)
    _print_summary(metrics)


@app.command()
def cohort(config: Annotated[Path, typer.Argument(help="experiment or cohort YAML")], data_root: DataRoot = None,
           out: CohortOut = None, set_: Sets = None) -> None:
    """Build the cohort table and its manifest (no images decoded)."""
    from readingrace.cohort.build import build_cohort
    from readingrace.config import load_config
    from readingrace.experiments.rundir import RunLock, write_atomic

    cfg = load_config(config, overrides=_overrides(set_))
    out_dir = out or Path("runs") / cfg.name / "cohort"
    with RunLock(out_dir):
        table, manifest = build_cohort(cfg.cohort, data_root=data_root)
        write_atomic(out_dir / "cohort.csv", table.to_csv(index=False))
        manifest.write(out_dir / "manifest.json")
    _say(manifest.flow_table().to_string(index=False))
    _say(f"{len(table)} images of {table['patient_id'].nunique()} patients -> {out_dir}")


@app.command()
def evaluate(predictions: Annotated[Path, typer.Argument(help="predictions.csv or a run folder")],
             out: EvalOut = None,
             strata: Annotated[Optional[list[str]], typer.Option("--stratum", help="column to stratify by (repeatable)")] = None,
             study_level: Annotated[bool, typer.Option(help="also aggregate to studies (mean probability)")] = False,
             n_bootstrap: Annotated[int, typer.Option(help="bootstrap replicates")] = 1000,
             val_predictions: Annotated[Optional[Path], typer.Option(help="validation predictions: choose thresholds there")] = None,
             compare: Annotated[Optional[Path], typer.Option(help="second predictions file: paired comparison")] = None,
             overwrite: Annotated[bool, typer.Option(help="replace an existing metrics.json")] = False) -> None:
    """Metrics with patient-clustered bootstrap and DeLong CIs for any predictions file."""
    from readingrace.evaluate import evaluate_file

    src = predictions if predictions.is_file() else predictions / "predictions.csv"
    out_dir = out or (src.parent / "evaluation")
    metrics = evaluate_file(src, out_dir=out_dir, n_bootstrap=n_bootstrap, strata=tuple(strata or ()),
                            study_level=study_level, val_predictions=val_predictions, compare=compare,
                            overwrite=overwrite)
    _print_summary(metrics)
    _say(f"wrote {out_dir / 'metrics.json'}")
    if compare is not None:
        from readingrace.evaluate import COMPARISON_FILE
        from readingrace.report.markdown import fmt_ci

        c = json.loads((out_dir / COMPARISON_FILE).read_text())
        typer.echo(f"paired difference, {predictions.name} - {compare.name}: macro AUC "
                   f"{fmt_ci(c.get('macro_difference'), c.get('macro_difference_ci'))} "
                   f"({c.get('n_images')} shared images)")
        _say(f"wrote {out_dir / COMPARISON_FILE}")


@app.command()
def confounders(config: Annotated[Path, typer.Argument(help="config with cohort: and confounders: sections")],
                data_root: DataRoot = None, out: ConfoundersOut = None, set_: Sets = None) -> None:
    """Tabular confounder analyses (B1 BMI, B2 density, B3 disease labels, chi-square); no images."""
    from readingrace.cohort.build import build_cohort
    from readingrace.config import load_config
    from readingrace.experiments.rundir import RunLock
    from readingrace.stats.confounders import confounders_markdown, run_confounders, write_confounders

    cfg = load_config(config, overrides=_overrides(set_))
    if not cfg.confounders:
        raise ConfigError(f"{config}: add a 'confounders:' section, e.g. {{analyses: [b3, chi_square], label_cols: [...]}}")
    spec = {"target": cfg.cohort.target, "seed": cfg.split.seed, **cfg.confounders}
    out_dir = out or Path("runs") / cfg.name / "confounders"
    with RunLock(out_dir):
        table, manifest = build_cohort(cfg.cohort, data_root=data_root)
        manifest.write(out_dir / "manifest.json")
        result = run_confounders(table, spec)
        write_confounders(result, out_dir)
    typer.echo(confounders_markdown(result))
    _say(f"wrote {out_dir}")


@app.command()
def suite(suite_dir: Annotated[str, typer.Argument(help="suite name under configs/ (e.g. 'paper') or a folder")],
          data: Annotated[Optional[list[str]], typer.Option("--data", help="NAME=PATH of a dataset (repeatable)")] = None,
          out: Annotated[Optional[Path], typer.Option("--out", "-o", help="suite output folder")] = None,
          budget: Annotated[str, typer.Option(help="budget profile: full | small")] = "full",
          attribute: Annotated[Optional[str], typer.Option(help="target for every run: race | sex | age_group")] = None,
          only: Annotated[Optional[list[str]], typer.Option("--only", help="experiment id or family (repeatable)")] = None,
          shard: Annotated[Optional[str], typer.Option(help="run shard I/N of the plan (1-based), e.g. 2/4")] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="list the plan, run nothing")] = False,
          set_: Sets = None) -> None:
    """Expand the paper's experiments into content-addressed runs and run them (done runs are reused)."""
    from readingrace.experiments.suite import (
        _read_side,
        index_name,
        parse_data,
        parse_shard,
        resolve_suite_dir,
        run_suite,
    )

    folder = resolve_suite_dir(suite_dir)
    datasets = parse_data(data or [], _read_side(folder, "_datasets.yaml"))
    out_dir = out or Path("runs") / f"suite-{Path(folder).name}"
    shard_ = parse_shard(shard)
    index = run_suite(folder, data=datasets, out=out_dir, budget=budget, attribute=attribute,
                      only=tuple(only or ()), shard_=shard_, overrides=_overrides(set_), dry_run=dry_run, say=_say)
    counts = ", ".join(f"{n} {status}" for status, n in sorted(index.get("counts", {}).items())) or "no runs"
    failed = index.get("counts", {}).get("failed", 0)
    reasons = f"; the reasons of the {failed} failed run(s) are in {out_dir / index_name(shard_)}"
    typer.echo(f"{counts}; {len(index['skipped'])} experiment(s) or point(s) skipped by the plan"
               + (" (dry run: nothing trained; plan written, suite index untouched)" if dry_run else "")
               + (reasons if failed else ""))
    if failed:
        raise typer.Exit(1)  # after every other run: a SLURM array shows the shard as failed


@app.command()
def collect(suites: Annotated[list[Path], typer.Argument(help="suite output folder(s) or suite*.json files")],
            out: Annotated[Optional[Path], typer.Option("--out", "-o", help="tables and figures folder")] = None) -> None:
    """Merge suite shards and write tidy CSV/Markdown tables and figures (one per experiment family)."""
    from readingrace.report.collect import collect as collect_suites

    result = collect_suites(suites, out=out or suites[0] / "collected")
    cells = sum(len(c) for c in result.external.values())
    extra = f" and {cells} external-validation cell(s) in {len(result.external)} matrix(es)" if cells else ""
    typer.echo(f"{len(result.runs)} run(s){extra} collected -> {result.out}")
    if result.pending_note():
        typer.echo(result.pending_note())


@app.command()
def report(inputs: Annotated[list[Path], typer.Argument(help="run folder(s) and/or suite folder(s)")],
           out: Annotated[Path, typer.Option("--out", "-o", help="report folder")] = Path("report")) -> None:
    """A self-contained HTML report (figures embedded) and its Markdown twin."""
    from readingrace.report.html import write_report

    paths = write_report(inputs, out=out, say=typer.echo)
    typer.echo(f"wrote {paths['html']} and {paths['markdown']}")


@app.command()
def predict(run_dir: Annotated[Path, typer.Argument(help="a finished run folder (readingrace run)")],
            data: Annotated[Path, typer.Option("--data", help="config of the other cohort (its cohort: section is used)")],
            data_root: DataRoot = None, out: PredictOut = None,
            mode: Annotated[Optional[str], typer.Option(help="bring images to the model's input: stretch (resize to "
                                                               "a square) | pad (zero-pad to a square first, keeping "
                                                               "the aspect ratio); default: the run's image.mode")] = None,
            set_: Sets = None) -> None:
    """External validation of one pair: apply a trained run, with its own preprocessing, to all images of
    another cohort (every ordered pair at once: `readingrace external`). Its images the model trained or
    validated on, and their patients, are left out; a config without cohort.target gets the model's."""
    from readingrace.experiments.external import cohort_from_config, predict_run, read_test_config

    other, names_target = read_test_config(data, overrides=_overrides(set_))
    out_dir = out or run_dir / "external" / other.name
    cohort = cohort_from_config(other, data_root=data_root, follow_model_target=not names_target)
    metrics = predict_run(run_dir, cohort, out=out_dir, mode=mode, say=_say)
    _print_summary(metrics)
    _say(f"wrote {out_dir}")


@app.command()
def probe(cohort_config: Annotated[Path, typer.Option("--cohort", help="experiment config whose cohort/split/image "
                                                                     "sections define the images")],
          model: Annotated[Optional[str], typer.Option(help="checkpoint (.ckpt/.pt, weights-only) or package.module:function")] = None,
          features: Annotated[Optional[Path], typer.Option(help="saved features (.npy + ids, .npz, .parquet, .csv)")] = None,
          layer: Annotated[Optional[str], typer.Option(help="named layer (default: the input of the classification head)")] = None,
          arch: Annotated[Optional[str], typer.Option(help="architecture of a bare state dict")] = None,
          target: Annotated[Optional[list[str]], typer.Option(help="attribute to probe (repeatable; default: the config's)")] = None,
          direct: Annotated[Optional[Path], typer.Option(help="predictions.csv of a model trained directly for the target")] = None,
          exclude_patients: Annotated[Optional[Path], typer.Option(
              help="CSV with a patient_id column: patients the model trained on, left out of the probe "
                   "(a readingrace run checkpoint needs none: its run's split is used)")] = None,
          data_root: DataRoot = None, out: ProbeOut = None,
          n_bootstrap: Annotated[int, typer.Option(help="bootstrap replicates")] = 1000) -> None:
    """Audit a model: does it encode race / sex / age? Linear and logistic probes on frozen features."""
    from readingrace.config import load_config
    from readingrace.experiments.run import prepare
    from readingrace.probe import read_patient_list, run_audit

    cfg = load_config(cohort_config)
    targets = list(target or [cfg.cohort.target])
    if direct is not None and len(targets) != 1:
        raise ConfigError("--direct compares with one target: give exactly one --target")
    excluded = read_patient_list(exclude_patients) if exclude_patients is not None else None
    _use_run_preprocessing(cfg, model)
    prep = prepare(cfg, data_root=data_root, say=_say)
    out_dir = out or Path("runs") / cfg.name / "probe"
    run_audit(images=prep.images, cohort=prep.cohort, out_dir=out_dir, targets=targets, model=model, layer=layer,
              arch=arch, features=features, direct_predictions={targets[0]: direct} if direct else None,
              n_bootstrap=n_bootstrap, seed=cfg.split.seed, exclude_patients=excluded, say=_say)
    _say(f"wrote {out_dir}")


EXTERNAL_HELP = (
    "External validation (paper Table 4): every trained run tested on every cohort, as one matrix.\n\n"
    "For every ordered pair (trained on X, tested on Y): X == Y is the run's own internal test (read from its "
    "metrics.json); otherwise X's model predicts Y into OUT/X__on__Y/ (reused when its inputs are unchanged). A "
    "--run cohort is tested through that run's test split (its cohort.csv), a --data cohort with all its images. "
    "Classes are matched by name: a model class absent from Y gets NaN with a note; Y's images of classes the "
    "model never learnt are counted out. Images X's model trained or validated on, and those patients' other "
    "images, are never scored (left out and counted in the cell's notes; a cell with nothing else left is "
    "refused). A --data config without cohort.target is built for each model's target; one naming another "
    "target is refused. Writes matrix.csv (tidy), matrix.md, matrix.png (heatmap) and "
    "external.json (read by `readingrace report`).\n\n"
    "Input mode (how other sites' images reach the model's square input): stretch resizes each image to the "
    "square, so a non-square image changes its aspect ratio; pad zero-pads the shorter side, centred, to a "
    "square first, so the aspect ratio is kept, with bands of zeros. Default: each trained run's own "
    "image.mode, i.e. what its model saw in training."
)


def _use_run_preprocessing(cfg, model: str | None) -> None:
    """A checkpoint from a readingrace run sees images prepared as in its training (size, mode, bit depth),
    whatever the --cohort config says; the change is said."""
    from readingrace.probe import run_folder_of

    run_dir = run_folder_of(model) if model else None  # a run folder always has its config.yaml
    if run_dir is None:
        return
    image = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("image") or {}
    changed = []
    for k in ("size", "mode", "bit_depth"):
        if k in image and image[k] != getattr(cfg.image, k):
            changed.append(f"{k} {image[k]} (the --cohort config: {getattr(cfg.image, k)})")
            setattr(cfg.image, k, image[k])
    if changed:
        _say("images prepared as the feature model's run was trained: " + ", ".join(changed))


@app.command(help=EXTERNAL_HELP)
def external(runs: Annotated[Optional[list[str]], typer.Option("--run", help="NAME=RUN_DIR of a finished run "
                                                                          "(repeatable); trained on cohort NAME")] = None,
             data: Annotated[Optional[list[str]], typer.Option("--data", help="NAME=CONFIG: a test-only cohort, from "
                                                                           "the cohort: section of an experiment "
                                                                           "YAML (repeatable)")] = None,
             data_roots: Annotated[Optional[list[str]], typer.Option("--data-root", help="NAME=PATH: data folder "
                                                                                      "of a --data cohort")] = None,
             mode: Annotated[Optional[str], typer.Option(help="stretch | pad (default: each run's own image.mode)")] = None,
             out: Annotated[Path, typer.Option("--out", "-o", help="output folder of the matrix and its cells")]
             = Path("runs") / "external") -> None:
    """External validation (paper Table 4): every trained run tested on every cohort, as one matrix."""
    from readingrace.experiments.external import external_validation, parse_named, read_test_config

    run_dirs = parse_named(runs or [], "--run")
    if not run_dirs:
        raise ConfigError("give at least one --run NAME=RUN_DIR (a finished `readingrace run` folder)")
    loaded = {name: read_test_config(path) for name, path in parse_named(data or [], "--data").items()}
    result = external_validation(run_dirs, {name: cfg for name, (cfg, _) in loaded.items()}, out=out, mode=mode,
                                 data_roots=parse_named(data_roots or [], "--data-root"),
                                 follow_model_target=[name for name, (_, named) in loaded.items() if not named],
                                 say=_say)
    typer.echo((out / "matrix.md").read_text())
    _say(f"{len(result['cells'])} cell(s) in {result['seconds']:.0f} s -> {out}")


@app.command()
def disease(config: Annotated[Path, typer.Argument(help="experiment YAML with a disease: section")],
            data_root: DataRoot = None, out: Out = None,
            force: Annotated[bool, typer.Option(help="redo a finished run in the same folder")] = False,
            set_: Sets = None, progress: Annotated[bool, typer.Option(help="show a progress bar")] = False) -> None:
    """Train a disease (multi-label) model and report its performance per group: AUC, TPR, FPR, underdiagnosis."""
    from readingrace.config import load_config
    from readingrace.experiments.disease import run_disease

    cfg = load_config(config, overrides=_overrides(set_))
    metrics = run_disease(cfg, out=out, data_root=data_root, force=force, progress=progress, say=_say)
    from readingrace.report.markdown import fmt

    typer.echo(f"mean test AUC over findings: {fmt(metrics.get('mean_auc'))}; operating threshold: "
               f"{metrics.get('threshold_source')}")


@app.command()
def subgroups(predictions: Annotated[Path, typer.Argument(help="predictions file (CSV/Parquet) or a run folder")],
              finding: Annotated[list[str] | None, typer.Option(
                  "--finding", help="finding F with columns label_F and prob_F (repeatable; default: every such "
                                    "pair)")] = None,
              group: Annotated[list[str] | None, typer.Option(
                  "--group", help="group column (repeatable); a+b for an intersection")] = None,
              threshold: Annotated[float | None, typer.Option(
                  help="fixed operating threshold for every finding")] = None,
              val_predictions: Annotated[Path | None, typer.Option(help="validation predictions: choose each "
                                                                      "finding's threshold there")] = None,
              rule: Annotated[str, typer.Option(help="threshold rule on --val-predictions: youden | f1")] = "youden",
              no_finding: Annotated[str, typer.Option(
                  help="the 'no finding' label behind the underdiagnosis rate")] = "No Finding",
              underdiagnosis: Annotated[bool, typer.Option(
                  help="report the underdiagnosis rate (off for predictions that are not of findings)")] = True,
              reference: Annotated[list[str] | None, typer.Option("--reference", help="COLUMN=GROUP reference group "
                                                                     "(default: the largest)")] = None,
              all_pairs: Annotated[bool, typer.Option(help="also compare every pair of groups")] = False,
              n_bootstrap: Annotated[int, typer.Option(help="bootstrap replicates")] = 1000,
              seed: Annotated[int, typer.Option(help="bootstrap seed")] = 2021,
              out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: "
                                                          "<predictions folder>/subgroups)")] = None,
              overwrite: Annotated[bool, typer.Option(help="replace existing subgroup files")] = False) -> None:
    """Per-group AUC, TPR, FPR and underdiagnosis with patient-bootstrap CIs, for any predictions file."""
    from readingrace.errors import RunError
    from readingrace.evaluate import resolve_predictions
    from readingrace.experiments.rundir import RunLock
    from readingrace.stats.subgroups import (
        read_predictions_table,
        subgroup_performance,
        subgroups_markdown,
        write_subgroups,
    )

    if not group:
        raise ConfigError("name at least one group column: --group sex (repeatable; --group sex+age_group for an "
                          "intersection)")
    if (threshold is None) == (val_predictions is None):
        raise ConfigError("give the operating threshold as --threshold X (one number for every finding) or "
                          "--val-predictions FILE (chosen there by --rule), not both and not neither")
    refs = {}
    for item in reference or []:
        if "=" not in item:
            raise ConfigError(f"--reference {item!r}: write COLUMN=GROUP, e.g. --reference sex=M")
        key, value = item.split("=", 1)
        refs[key.strip()] = value.strip()
    src = resolve_predictions(predictions)
    out_dir = out or src.parent / "subgroups"
    if (out_dir / "subgroups.json").exists() and not overwrite:
        raise RunError(f"{out_dir / 'subgroups.json'} already exists; pass --overwrite to replace it or --out for "
                       "another folder")
    val = read_predictions_table(val_predictions) if val_predictions is not None else None
    result = subgroup_performance(
        read_predictions_table(src), findings=finding or None, groups=group, threshold=threshold,
        val_predictions=val, threshold_rule=rule, no_finding=no_finding, underdiagnosis=underdiagnosis,
        reference=refs or None,
        all_pairs=all_pairs, n_bootstrap=n_bootstrap, seed=seed, source=str(src),
        val_source=str(val_predictions) if val_predictions else "validation predictions")
    with RunLock(out_dir):
        write_subgroups(result, out_dir)
    typer.echo(subgroups_markdown(result))
    _say(f"wrote {out_dir}")


def _print_summary(metrics: dict) -> None:
    from readingrace.report.markdown import fmt_ci

    summary = metrics.get("seed_summary") or {}
    seed = f" (seed {summary['reported_seed']})" if summary.get("n", 1) > 1 else ""
    lines = [f"macro AUC{seed} {fmt_ci(metrics.get('macro_auc'), metrics.get('macro_auc_ci'))}"]
    if seed:
        lines.append(f"  over {summary['n']} seeds: mean {summary['macro_auc_mean']:.3f}, "
                     f"range {summary['macro_auc_min']:.3f}-{summary['macro_auc_max']:.3f}")
    for cls, m in metrics.get("per_class", {}).items():
        lines.append(f"  {cls}: AUC {fmt_ci(m.get('auc'), m.get('auc_ci'))}")
    ref = metrics.get("reference")
    if ref:
        lines.append(f"reference ({ref.get('name')}): macro AUC {fmt_ci(ref.get('macro_auc'), ref.get('macro_auc_ci'))}")
    typer.echo("\n".join(lines))


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning as the console shows it: one line, like the log messages (no source file or code line).
    Used as ``warnings.formatwarning``, so tools that record warnings (pytest.warns) still see them."""
    text = " ".join(str(message).split())
    return (f"WARNING: {text}\n" if issubclass(category, UserWarning)
            else f"WARNING: {category.__name__}: {text}\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning the project's errors into one-line messages."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = previous


def _main(argv: list[str] | None) -> int:
    interrupted = 130  # exit status after Ctrl-C (128 + SIGINT, as a shell reports it)
    try:
        # a command's exit status comes back as the return value (typer turns Ctrl-C into 130)
        rc = app(args=argv, standalone_mode=False)
    except ReadingRaceError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        rc = interrupted
    except SystemExit as exc:
        if not is_interruption(exc):
            raise
        rc = interrupted  # Lightning answers Ctrl-C during training with sys.exit(1)
    except typer.Abort:
        return 1
    except Exception as exc:
        # usage errors (typer bundles its own click): print the usage message, no traceback
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    if rc == interrupted:
        typer.echo("interrupted; run the same command again to resume from the last completed epoch", err=True)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
