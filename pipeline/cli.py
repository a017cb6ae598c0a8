"""``mixer-study``: the command line. Each verb is a thin wrapper over a library function.

  models    list the model variants with sizes and FLOPs
  shards    write WebDataset shards (digits, ImageFolder, a generated corpus) or index a WebDataset corpus
  plan      dry run of a study: grid, steps, epochs, FLOPs, device-seconds and cost (no Ray)
  run       run a study on Ray Tune (embedded local Ray, or --address / $RAY_ADDRESS)
  resume    finish an interrupted study
  sync      send to MLflow what a study spooled while the tracking server was down
  train     run one trial (a study's base recipe, with --set overrides)
  fewshot   linear few-shot evaluation of a checkpoint
  report    results table + the paper's figures (and scaling laws) from a study's MLflow runs
  fit       scaling laws with bootstrap intervals: of a study (into its report and MLflow) or of a CSV
  findings  the paper's findings F1-F6 with 95 % intervals over seeds, from the shipped CPU studies
  ui        the MLflow UI on 127.0.0.1
  bench     speed benchmarks (prints a table, writes JSON)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from workers.names import BEST_VAL_ACC, FEWSHOT_5SHOT


def _models(args: argparse.Namespace) -> None:
    from workers.models.registry import FAMILIES, check_fits, forward_flops, param_count, shape_summary

    size, classes = args.image_size, args.num_classes
    print(f"model variants of every family (image size {size}, {classes} classes; S = tokens)")
    for family in FAMILIES.values():
        print(f"\n{family.name} ({family.kind}); any {family.syntax}")
        print(f"  {'variant':<12} {'params':>13} {'GFLOPs/img':>10} {'S':>5}  {'shape':<60} description")
        for v in family.variants.values():
            try:
                check_fits(v, size)
            except ValueError as error:
                print(f"  {v.name:<12}  -- {error}")
                continue
            tokens = (size // v.patch_size) ** 2 if v.patch_size else "-"
            print(f"  {v.name:<12} {param_count(v, size, classes):>13,} {forward_flops(v, size, classes) / 1e9:>10.4g} "
                  f"{tokens:>5}  {shape_summary(v):<60} {v.description}")


def _shards(args: argparse.Namespace) -> None:
    from workers.data.writer import shards_from_digits, shards_from_imagefolder

    if args.samples_per_shard is None:  # bigger shards for the large generated corpus (fewer files to open)
        args.samples_per_shard = 250 if args.source == "synthetic" else 25
    if args.source == "wds":  # an existing WebDataset corpus: index it in place, or --reshard it shuffled
        from workers.data.wds_index import index_webdataset, reshard

        if not args.root:
            raise SystemExit("mixer-study shards --from wds needs --root 'URL-{000000..001023}.tar' (a brace pattern)")
        labels = {"label_key": args.label_key, "classes": args.classes}
        if args.reshard:
            manifests = {args.split: reshard(args.root, args.out, args.split, samples_per_shard=args.samples_per_shard,
                                             seed=args.seed, **labels)}
        else:
            manifests = {args.split: index_webdataset(args.root, args.out, args.split, **labels)}
    elif args.source == "synthetic":
        from workers.data.synthetic import shards_from_synthetic

        if args.format == "jpeg":
            raise SystemExit("mixer-study shards --from synthetic writes PNG shards; --format jpeg is for"
                             " --from imagefolder")
        manifests = shards_from_synthetic(args.out, seed=args.seed, size=args.size, image_size=args.image_size,
                                          samples_per_shard=args.samples_per_shard,
                                          num_pretrain=args.pretrain_classes, num_transfer=args.transfer_classes)
    elif args.source == "digits":
        if args.format == "jpeg":
            raise SystemExit("mixer-study shards --from digits writes square PNG shards; --format jpeg is for"
                             " --from imagefolder")
        manifests = shards_from_digits(args.out, image_size=args.image_size, samples_per_shard=args.samples_per_shard,
                                       seed=args.seed)
    else:
        if not args.root:
            raise SystemExit("mixer-study shards --from imagefolder needs --root DIR (class_name/*.jpg|png)")
        manifests = shards_from_imagefolder(args.root, args.out, image_size=args.image_size,
                                            samples_per_shard=args.samples_per_shard, seed=args.seed,
                                            image_format=args.format, jpeg_quality=args.jpeg_quality)
    for split, m in manifests.items():
        size = f"{m.image_size}px" if m.image_size else "images of varying size (set data.image_size)"
        print(f"{split:>6}: {m.num_samples:6d} samples in {len(m.shards):4d} shards, {m.num_classes} classes, "
              f"{size} -> {m.url}")


def _plan(args: argparse.Namespace) -> None:
    from pipeline.plan import calibrate, format_ledger, format_plan, plan_costs, plan_study
    from pipeline.spec import load_study

    spec = load_study(args.study)
    plans = plan_study(spec)
    print(format_plan(spec, plans))
    calibration = calibrate(spec, tracking_uri=args.tracking_uri, bench=args.bench, price=args.price_per_hour,
                            kind=args.device_kind)
    print()
    print(format_ledger(plans, plan_costs(spec, plans, calibration), calibration))


def _run(args: argparse.Namespace) -> None:
    from pipeline.spec import load_study
    from pipeline.tune import run_study

    spec = load_study(args.study)
    rows = run_study(spec, address=args.address, tracking_uri=args.tracking_uri, storage=args.storage)
    _print_rows(rows)
    from pipeline.tracking import redact_url

    tracking = f" --tracking-uri {redact_url(args.tracking_uri)}" if args.tracking_uri else ""
    print(f"next: mixer-study report {spec.name}{tracking}")
    if any(r["status"] != "DONE" for r in rows):
        raise SystemExit(1)


def _study_name(value: str) -> tuple[str, Any]:
    """A study's name and its validated spec from a study YAML path (``*.yaml``/``*.yml``), else ``value`` itself
    as the name and no spec: `report`, `resume` and `sync` take either."""
    if not value.endswith((".yaml", ".yml")):
        return value, None
    from pipeline.spec import load_study

    spec = load_study(value)
    return spec.name, spec


def _resume(args: argparse.Namespace) -> None:
    from pipeline.tune import resume_study

    rows = resume_study(_study_name(args.name)[0], address=args.address, storage=args.storage)
    _print_rows(rows)
    if any(r["status"] != "DONE" for r in rows):
        raise SystemExit(1)


def _sync(args: argparse.Namespace) -> None:
    from pipeline.tune import sync_study

    sync_study(_study_name(args.name)[0], storage=args.storage)


def _print_rows(rows: list[dict[str, Any]]) -> None:
    def fmt(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "-"

    print(f"{'trial':<40} {'status':>6} {'best val/acc':>12} {'5-shot':>7}")
    for r in rows:
        print(f"{r['trial']:<40} {r['status']:>6} {fmt(r[BEST_VAL_ACC]):>12} {fmt(r[FEWSHOT_5SHOT]):>7}")


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value (e.g. model.variant=Micro-4), got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _train(args: argparse.Namespace) -> None:
    from pipeline.plan import plan_study
    from pipeline.spec import load_study, parse_study
    from pipeline.tracking import connect_tracking, resolve_tracking_uri
    from pipeline.trial import ONE_OFF, make_job, refuse_changed_rerun, run_trial
    from pipeline.tune import init_ray, is_embedded, ray_logs_dir, resolve_storage

    # One trial = the study with a one-point grid of the --set overrides: same validation, same plan checks.
    raw = load_study(args.config).model_dump(mode="json")
    raw["grid"] = {key: [value] for key, value in _parse_overrides(args.set).items()}
    raw.update(sweep={}, replicates=1)  # one run of the base recipe (with --set), not the study's sweep or seeds
    spec = parse_study(raw, source=f"{args.config} with --set {' '.join(args.set)}".strip())
    (plan,) = plan_study(spec)
    name = args.name or "train-" + plan.name
    tracking_uri = connect_tracking(resolve_tracking_uri(args.tracking_uri, spec.tracking.uri),
                                    embedded_ray=is_embedded(args.address))
    # A one-off run has its own MLflow role, so it never enters the study's results table or figures.
    job = make_job(spec, name, plan.config, plan.point, tracking_uri=tracking_uri,
                   storage=resolve_storage(args.storage), role=ONE_OFF)
    refuse_changed_rerun(job)  # before Ray starts
    init_ray(args.address)
    r = spec.resources
    print(f"trial {name}: {r.workers_per_trial} workers; MLflow {tracking_uri}; Ray logs {ray_logs_dir()}")
    final = run_trial(job)
    print(json.dumps(final, indent=2))


def _fewshot(args: argparse.Namespace) -> None:
    from analysis.features import fewshot_for_model
    from workers.training.checkpoint import load_model, read_permute

    train = args.train or (f"{args.data.rstrip('/')}/train" if args.data else None)
    test = args.test or (f"{args.data.rstrip('/')}/test" if args.data else None)
    if not (train and test):
        raise SystemExit("give --data SHARD_DIR (with train/ and test/ splits) or both --train and --test")
    model = load_model(args.checkpoint)
    permute = read_permute(args.checkpoint)  # a model trained on permuted images (Fig. 4) is evaluated on them
    if permute:
        patch = f"patch {permute.patch}, " if permute.mode == "patches" else ""
        print(f"input permutation {permute.mode} ({patch}seed {permute.seed}) from the checkpoint, applied to both "
              "splits")
    args.train_samples = args.train_samples or None
    metrics = fewshot_for_model(model, train, test, shots=tuple(args.shots), seeds=args.seeds, l2_reg=args.l2_reg,
                                train_samples=args.train_samples, crop_fraction=args.crop_fraction, permute=permute)
    for key, value in metrics.items():
        print(f"{key:>24}: {value:.4f}")


def _study_store(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """The study's name, its tracking URI and MLflow experiment, from a name or a study YAML (`report`, `fit`)."""
    from pipeline.tracking import connect_tracking, resolve_tracking_uri

    study, spec = _study_name(args.study)
    uri = connect_tracking(resolve_tracking_uri(args.tracking_uri, spec.tracking.uri if spec else None))
    return study, uri, getattr(args, "experiment", None) or (spec.tracking.experiment if spec else None)


def _progress_on_stderr(logger_name: str) -> None:
    """Show ``logger_name``'s INFO lines (a long analysis's progress) on stderr, as plain text, once."""
    logger = logging.getLogger(logger_name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _report(args: argparse.Namespace) -> None:
    from analysis.report import build_report

    _progress_on_stderr("analysis.scaling_report")
    study, uri, experiment = _study_store(args)
    out = args.out or f"results/{study}"
    paths = build_report(uri, study, out, experiment=experiment, bootstrap=args.bootstrap, seed=args.seed)
    print(f"report of study {study}: {len(paths)} files in {Path(out).resolve()}")
    for path in paths:
        print(f"  {path}")


def _findings(args: argparse.Namespace) -> None:
    from analysis import findings as paper
    from analysis.results import load_study
    from pipeline.tracking import connect_tracking, redact_url, resolve_tracking_uri

    uri = connect_tracking(resolve_tracking_uri(args.tracking_uri, None))
    findings = []
    for study, keys, decide in (
            (args.data_fraction, paper.DATA_FRACTION_KEYS, paper.data_fraction_findings),
            (args.permutation, paper.PERMUTATION_KEYS, paper.permutation_findings),
            (args.model_scale, paper.MODEL_SCALE_KEYS, paper.model_scale_findings)):
        try:
            df = load_study(uri, study)
        except LookupError as missing:  # no such experiment: the study was not run into this store
            findings += paper.not_run(keys, str(missing))
            continue
        findings += decide(df) if len(df) else paper.not_run(keys, f"no runs of study {study!r} in {redact_url(uri)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = paper.markdown(findings)
    (out / "findings.md").write_text(text)
    (out / "findings.json").write_text(json.dumps([vars(f) for f in findings], indent=2))
    print(text)
    print(f"-> {out / 'findings.md'}, {out / 'findings.json'}")


def _ui(args: argparse.Namespace) -> None:
    from pipeline.tracking import resolve_tracking_uri
    from pipeline.ui import serve

    raise SystemExit(serve(resolve_tracking_uri(args.tracking_uri), args.host, args.port, name=args.study,
                           open_browser=args.open))


def _bench(args: argparse.Namespace) -> None:
    from benchmarks.run import bench_config, quick_config, run_benchmarks

    if args.orchestration_finetune_steps is not None and args.orchestration_finetune_steps < 0:
        raise ValueError(f"--orchestration-finetune-steps: {args.orchestration_finetune_steps} is negative; give a "
                         "number of steps >= 1, or 0 for no fine-tuning")

    overrides = {"variants": tuple(args.variants) if args.variants else None, "image_size": args.image_size,
                 "batch_sizes": tuple(args.batch_sizes) if args.batch_sizes else None, "paper": args.paper or None,
                 "threads": args.threads, "repeats": args.repeats, "compile": args.compile or None,
                 "orchestration": args.orchestration, "orchestration_finetune_steps": args.orchestration_finetune_steps}
    if args.quick:
        config = quick_config(**overrides)
    else:
        config = bench_config(args.device, **overrides)
    results = run_benchmarks(config, out=args.out)
    if results["failed_sections"]:
        raise SystemExit(1)


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help, unless the help already names its default or there is none to
    show (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
        if action.option_strings and not unset and "default" not in text:
            text += " (default: %(default)s)"
        return text


def _fit(args: argparse.Namespace) -> None:
    from analysis.scaling.table import fit_table

    if args.csv is None:
        _fit_study(args)
        return
    if args.json is None:
        raise ValueError("mixer-study fit --csv FILE needs --json OUT (where the fit goes)")
    needed = {"chinchilla": {"N": args.n, "D": args.d}, "saturating": {"C": args.c},
              "isoflop": {"N": args.n, "C": args.c}}[args.form]
    for name, column in needed.items():
        if column is None:
            raise ValueError(f"--form {args.form} needs --{name.lower()} COLUMN (the runs' {name})")
    if args.form == "isoflop":
        _fit_isoflop(args)
        return
    result = fit_table(args.csv, args.form, needed, args.y, group=args.group, draws=args.bootstrap, seed=args.seed,
                       predict_path=args.predict)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    cert = result["certificate"]
    print(f"{args.form} fit of {result['n_points']} runs ({result['n_groups']} groups), {args.bootstrap} bootstrap "
          f"resamples; optimiser {'converged' if cert['converged'] else 'DID NOT CONVERGE'} "
          f"(objective {cert['objective']:.6g}, gradient norm {cert['grad_norm']:.2g})")
    for name, (lo, hi) in result["ci95"].items():
        value = result["params"].get(name, result["derived"].get(name))
        print(f"  {name:>12} {value:12.5g}   95 % [{lo:.5g}, {hi:.5g}]")
    print(f"-> {args.json}")


def _fit_isoflop(args: argparse.Namespace) -> None:
    from analysis.scaling.table import isoflop_table

    if args.predict is not None or args.group is not None:
        raise ValueError("--form isoflop takes neither --predict nor --group (its bootstrap redraws runs within each "
                         "compute budget)")
    result = isoflop_table(args.csv, args.n, args.c, args.y, draws=args.bootstrap, seed=args.seed)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    lo, hi = result["ci95"]["a"]
    print(f"isoFLOP minima of {result['n_points']} runs: {len(result['budgets'])} budgets with an interior minimum; "
          f"N_opt ∝ C^a, a = {result['params']['a']:.4g}, 95 % [{lo:.4g}, {hi:.4g}] ({args.bootstrap} resamples within "
          f"budgets, {result['bootstrap']['draws_without_exponent']:.0%} of them without an exponent)")
    print(f"-> {args.json}")


def _fit_study(args: argparse.Namespace) -> None:
    from analysis.report import fit_study

    if args.study is None:
        raise ValueError("mixer-study fit needs a STUDY (name or YAML) or --csv FILE")
    _progress_on_stderr("analysis.scaling_report")
    study, uri, experiment = _study_store(args)
    out = args.out or f"results/{study}/scaling"
    paths = fit_study(uri, study, out, experiment, bootstrap=args.bootstrap, seed=args.seed)
    print(Path(out, "scaling.md").read_text())
    print(f"scaling laws of study {study}: {len(paths)} files in {Path(out).resolve()}, logged to its parent run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixer-study", description=__doc__.split("\n\n")[0].replace("``", ""),
                                     epilog="mixer-study VERB --help shows a verb's options.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB",
                                  parser_class=functools.partial(argparse.ArgumentParser,
                                                                 formatter_class=_DefaultsHelpFormatter))
    add_verb = verbs.add_parser

    def add_verb_with_description(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        """``verbs.add_parser`` with the verb's one-line help as its ``VERB --help`` description too (argparse
        %-formats a help string but prints a description as it is: "95 %%" becomes "95 %" there too)."""
        help_text = kwargs.get("help")
        kwargs.setdefault("description", help_text.replace("%%", "%") if help_text else help_text)
        return add_verb(name, **kwargs)

    verbs.add_parser = add_verb_with_description  # every verb, including ones added below by later edits

    p = verbs.add_parser("models", help="list model variants")
    p.add_argument("--image-size", type=int, default=224, help="input resolution the sizes and FLOPs are for")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head")
    p.set_defaults(func=_models)

    p = verbs.add_parser("shards", help="write WebDataset shards")
    p.add_argument("--from", dest="source", choices=["digits", "imagefolder", "wds", "synthetic"],
                   default="digits", help="wds: an existing WebDataset corpus (--root pattern): writes only its"
                   " manifest, or --reshard; synthetic: the generated corpus (OUT/pretrain/{train,val}, OUT/transfer/"
                   "{train,val,test}; README \"Synthetic corpus\")")
    p.add_argument("--root", help="ImageFolder root (class_name/*.jpg|png) for --from imagefolder; for --from wds the"
                   " shards' brace pattern, e.g. 's3://bucket/imagenet/train-{000000..001023}.tar'")
    p.add_argument("--split", default="train", help="--from wds: split name, the manifest goes to OUT/SPLIT/")
    p.add_argument("--label-key", choices=["cls", "json"], default="cls",
                   help="--from wds: label from the .cls entry, or from the .json entry's \"label\" (else \"cls\")")
    p.add_argument("--classes", help="--from wds: file with one class name per line (line i = label i); "
                   "default 0..K-1")
    p.add_argument("--reshard", action="store_true",
                   help="--from wds: write the corpus as shuffled shards (images copied unchanged, "
                   "--samples-per-shard each) instead of indexing it in place; needed for class-sorted corpora")
    p.add_argument("--out", required=True, help="output folder (any fsspec URL); one subfolder per split")
    p.add_argument("--image-size", type=int, default=16,
                   help="stored shorter side (keep >= 1.14 x the training size for inception crops); imagefolder"
                   " images keep their aspect ratio, digits are square")
    p.add_argument("--format", choices=["png", "jpeg"], default="png",
                   help="sample encoding: png (lossless) or jpeg (several times smaller for photos; imagefolder only)")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality 1..100 for --format jpeg")
    p.add_argument("--samples-per-shard", type=int, help="samples per tar shard (default 25; --from synthetic 250)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle (and of the train/val/test split); "
                   "--from synthetic: of the images (the classes are fixed)")
    p.add_argument("--size", type=int, default=32_000, help="--from synthetic: pre-training train images (val 10 %%"
                   " of it; transfer 100/50/100 per class at 32,000, scaled down below)")
    p.add_argument("--pretrain-classes", type=int, default=64, help="--from synthetic: pre-training classes")
    p.add_argument("--transfer-classes", type=int, default=16,
                   help="--from synthetic: transfer classes (no set of parts shared with pre-training)")
    p.set_defaults(func=_shards)

    p = verbs.add_parser("plan", help="dry run: the grid, steps, epochs, FLOPs, device-seconds and cost of a study")
    p.add_argument("study", help="study YAML file")
    p.add_argument("--bench", help="a `mixer-study bench` JSON whose train_step img/s calibrate the device-seconds "
                                   "(default resources.calibration); used only if measured on the study's device kind")
    p.add_argument("--price-per-hour", type=float,
                   help="price of one device (CPU core or GPU) per hour (default resources.price_per_device_hour)")
    p.add_argument("--device-kind", help="the device the trials will run on, as trials tag it: 'cpu:<CPU model>' or "
                                         "'cuda:<GPU name>' (default resources.device_kind, else this machine's)")
    p.add_argument("--tracking-uri", help="MLflow store whose earlier finished runs calibrate the device-seconds "
                                          "(default: study file, $MLFLOW_TRACKING_URI, else sqlite ./mlflow.db)")
    p.set_defaults(func=_plan)

    ray_args = argparse.ArgumentParser(add_help=False)
    ray_args.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else an embedded local Ray)")
    ray_args.add_argument("--storage", help="checkpoint/experiment storage, a path or URL such as s3://bucket/x "
                                            "(default $MIXER_STUDY_STORAGE, else ./runs)")
    track_args = argparse.ArgumentParser(add_help=False)  # verbs that read a study file
    track_args.add_argument("--tracking-uri", help="MLflow tracking URI (default: the study file's tracking.uri, "
                                                   "else $MLFLOW_TRACKING_URI, else sqlite ./mlflow.db)")
    store_args = argparse.ArgumentParser(add_help=False)  # verbs that take no study file
    store_args.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite "
                                                   "./mlflow.db)")

    p = verbs.add_parser("run", parents=[ray_args, track_args], help="run a study on Ray Tune")
    p.add_argument("study", help="study YAML file")
    p.set_defaults(func=_run)

    p = verbs.add_parser("resume", parents=[ray_args], help="finish an interrupted study")
    p.add_argument("name", metavar="STUDY", help="study name (as in its YAML) or the study YAML file")
    p.set_defaults(func=_resume)

    p = verbs.add_parser("sync", help="send to MLflow what a study spooled while its tracking server was down")
    p.add_argument("name", metavar="STUDY", help="study name (as in its YAML) or the study YAML file")
    p.add_argument("--storage", help="the study's storage (default $MIXER_STUDY_STORAGE, else ./runs)")
    p.set_defaults(func=_sync)

    p = verbs.add_parser("train", parents=[ray_args, track_args], help="run one trial of a study's base recipe")
    p.add_argument("--config", required=True, help="study YAML file (its base recipe is trained; grid ignored)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set model.variant=Micro-4 (repeatable)")
    p.add_argument("--name", help="trial name (default train-<overrides>); rerunning a name continues it")
    p.set_defaults(func=_train)

    p = verbs.add_parser("fewshot", help="linear few-shot accuracy of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (state.pt + model.json)")
    p.add_argument("--data", help="downstream shard folder with train/ and test/ splits")
    p.add_argument("--train", help="manifest URL of the split the k-shot sets come from")
    p.add_argument("--test", help="manifest URL of the test split")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10, 25], help="examples per class (k of k-shot)")
    p.add_argument("--seeds", type=int, default=3, help="random k-shot training sets per k (the mean is reported)")
    p.add_argument("--l2-reg", type=float, default=2.0**10, help="L2 regularisation of the linear probe")
    p.add_argument("--train-samples", type=int, default=65_000,
                   help="use the first N samples of the train split (big_vision train[:65000]; 0 = all)")
    p.add_argument("--crop-fraction", type=float, default=0.875,
                   help="evaluation view: resize the shorter side to size/this, central crop (the trial's "
                        "data.augment.eval_crop_fraction)")
    p.set_defaults(func=_fewshot)

    p = verbs.add_parser("report", parents=[track_args], help="results table and paper figures of a study")
    p.add_argument("study", metavar="STUDY", help="study name (as in its YAML) or the study YAML file")
    p.add_argument("--out", help="output folder (default results/<study>)")
    p.add_argument("--experiment", help="MLflow experiment if not the study name")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples per scaling-law fit")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.set_defaults(func=_report)

    p = verbs.add_parser("findings", parents=[track_args],
                         help="the paper's findings F1-F6, each with its 95 %% interval over seeds, from the "
                              "data-fraction, permutation and model-scale studies (docs/cpu-studies.md)")
    p.add_argument("--data-fraction", default="data_fraction", help="data-fraction study name (F1-F3)")
    p.add_argument("--permutation", default="permutation", help="permutation study name (F4, F5)")
    p.add_argument("--model-scale", default="model_scale", help="model-scale study name (F6)")
    p.add_argument("--out", default="results/findings", help="output folder (findings.md, findings.json)")
    p.set_defaults(func=_findings)

    p = verbs.add_parser("ui", parents=[store_args],
                         help="serve the MLflow UI of the tracking store and print the link to a study's runs table "
                              "(Ctrl-C or SIGTERM stops it)")
    p.add_argument("study", nargs="?", metavar="STUDY",
                   help="the study to link to (default: the most recently started study in the store)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="TCP port of the UI")
    p.add_argument("--open", action="store_true", help="also open the link in the default web browser")
    p.set_defaults(func=_ui)

    p = verbs.add_parser("bench", help="speed benchmarks: matmul ceiling, training step and inference, loader, "
                                       "orchestration, few-shot (tables + JSON)")
    p.add_argument("--variants", nargs="+", help="models at --image-size (default Micro-4 Mini-4 S-32)")
    p.add_argument("--image-size", type=int, help="resolution of --variants (default 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+",
                   help="training batch sweep (default 16 64 256 on CPU, 256 1024 4096 on a GPU)")
    p.add_argument("--paper", action="store_true", help="also S-32 and B-16 at 224 px (slow on CPU: time-capped)")
    p.add_argument("--orchestration", action=argparse.BooleanOptionalAction, default=None,
                   help="run a tiny real study (2 trials x 2 workers, embedded Ray) for per-trial overhead and "
                        "goodput (default on; off with --quick)")
    p.add_argument("--orchestration-finetune-steps", type=int, metavar="N",
                   help="each orchestration trial also fine-tunes, 3 lrs x N steps (default 0: no fine-tuning)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--threads", type=int, help="torch threads on CPU (default 1: per-core numbers)")
    p.add_argument("--repeats", type=int, help="timed steps per cell at most (default 10)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training steps")
    p.add_argument("--quick", action="store_true", help="a tiny configuration of seconds (Nano-4, 16 px, CPU)")
    p.add_argument("--out", default="bench-results/bench.json", help="where the JSON results go")
    p.set_defaults(func=_bench)

    p = verbs.add_parser("fit", parents=[track_args],
                         help="fit scaling laws with bootstrap intervals to a study's runs or to a CSV of runs")
    p.add_argument("study", nargs="?", metavar="STUDY",
                   help="study name (as in its YAML) or the study YAML file: every law its grid supports, into the "
                        "report folder and its parent MLflow run")
    p.add_argument("--out", help="STUDY: output folder (default results/<study>/scaling)")
    p.add_argument("--experiment", help="STUDY: MLflow experiment if not the study name")
    p.add_argument("--csv", help="CSV file, one run per row")
    p.add_argument("--form", choices=["chinchilla", "saturating", "isoflop"], default="chinchilla",
                   help="chinchilla: L = E + A/N^alpha + B/D^beta; saturating: E = a (C + d)^-b + c; isoflop: "
                   "approach 2, N_opt per compute budget and N_opt ∝ C^a (runs of a budget share one --c value)")
    p.add_argument("--n", help="chinchilla, isoflop: column of parameters N")
    p.add_argument("--d", help="chinchilla: column of samples seen D")
    p.add_argument("--c", help="saturating, isoflop: column of training compute C")
    p.add_argument("--y", default="loss", help="column of the loss/error (default loss)")
    p.add_argument("--group", help="column of group labels: the bootstrap resamples whole groups (runs sharing a "
                   "model size, seed or family)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (default 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    p.add_argument("--predict", help="CSV with the same input columns: a 95 %% prediction interval per row")
    p.add_argument("--json", help="--csv: output JSON (required with --csv)")
    p.set_defaults(func=_fit)
    return parser


def main(argv: list[str] | None = None) -> None:
    from pipeline.spec import StudyError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (StudyError, LookupError, OSError, ValueError) as error:  # expected: bad input or environment
        if os.environ.get("MIXER_STUDY_DEBUG"):
            raise
        print(f"mixer-study {args.verb}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
