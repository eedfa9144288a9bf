"""The ``adapterkit`` command line."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import sys
import tempfile
import traceback
from pathlib import Path
from types import ModuleType

from huggingface_hub import constants, scan_cache_dir
from huggingface_hub.errors import CacheNotFound

import adapterkit as ak
import adapterkit.data as akdata
from adapterkit.artifacts import read_sidecar
from adapterkit.errors import cli_spelling, did_you_mean
from adapterkit.evaluate import evaluate_classifier, evaluate_label_words
from adapterkit.hub import download
from adapterkit.models import EMBEDDED_MODELS
from adapterkit.options import read_config
from adapterkit.prompting import PromptTemplate
from adapterkit.serve import add_parser as add_serve_parser
from adapterkit.sources import resolve_source


def _cmd_list(args: argparse.Namespace) -> int:
    print("strategies:", ", ".join(ak.list_strategies()))
    cached = cached_adapters()
    print(f"cached adapters ({len(cached)}):")
    for repo_id, revision, sidecar in cached:
        print(f"  {repo_id}@{revision[:8]}  {sidecar.get('strategy')}  base={sidecar.get('base_model', {}).get('id')}")
    return 0


def cached_adapters() -> list[tuple[str, str, dict]]:
    """Adapters in the local Hub cache: (repo id, commit, sidecar) for folders with a sidecar."""
    try:
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        for rev in repo.revisions:
            sidecar = rev.snapshot_path / "adapterkit.json"
            if sidecar.is_file():
                found.append((repo.repo_id, rev.commit_hash, json.loads(sidecar.read_text())))
    return found


PEFT_CONFIG = "adapter_config.json"


def _read_adapter(folder: Path, source: str) -> dict | None:
    """The sidecar of the adapter in ``folder``; None for a plain peft adapter; an error for anything else."""
    sidecar = read_sidecar(folder)
    if sidecar is None and not (folder / PEFT_CONFIG).is_file():
        files = sorted(p.name for p in folder.iterdir())[:10]
        raise ak.AdapterNotFoundError(
            f"{source} is a folder but holds no adapter: neither an adapterkit sidecar (adapterkit.json) nor a "
            f"peft {PEFT_CONFIG} is in it (it has {files or 'no files'}). Pass the folder adapterkit.save wrote."
        )
    return sidecar


def _describe(folder: Path, source: str) -> str:
    sidecar = _read_adapter(folder, source)
    if sidecar is None:
        return f"{folder}: a plain peft adapter (no adapterkit sidecar); its base cannot be verified"
    base = sidecar.get("base_model") or {}
    fingerprint = base.get("fingerprint") or {}
    lines = [
        f"adapter     {sidecar.get('name')} ({sidecar.get('strategy')}, format v{sidecar.get('format_version')})",
        f"base        {base.get('id')}  fingerprint {fingerprint.get('weights') if isinstance(fingerprint, dict) else fingerprint}",
        f"quantized   {sidecar.get('quantization') or 'no'}",
        f"task        {sidecar.get('task')}  labels {sidecar.get('label_names')}",
        f"options     {sidecar.get('options')}",
        f"metrics     {sidecar.get('metrics')}",
        f"files       {sorted(p.name for p in folder.iterdir())}",
        f"size        {sum(p.stat().st_size for p in folder.iterdir() if p.is_file()):,} bytes",
    ]
    return "\n".join(lines)


def _folder(text: str, revision: str | None) -> Path:
    """A local adapter folder, or the Hub repo ``text`` downloaded; a missing path or a file is said as such."""
    source = resolve_source(text, what="adapter folder", error=ak.AdapterNotFoundError)
    if source.kind == "folder":
        return source.path
    if source.kind == "file":
        raise ak.AdapterNotFoundError(
            f"{text} is a file, not an adapter folder: pass the folder adapterkit.save wrote (the one holding "
            f"adapterkit.json{', e.g. ' + str(source.path.parent) if source.path.name in ('adapterkit.json', PEFT_CONFIG) else ''})."
        )
    if "/" not in source.repo_id:
        # Adapters live in user repos ("owner/name"); a bare word is a folder that is not there, not a Hub
        # model such as "gpt2".
        raise ak.AdapterNotFoundError(
            f"No such adapter folder: {text} does not exist (relative to {Path.cwd()}), and it is not a Hub repo "
            "id of an adapter either (those read 'owner/name'). Check the path."
        )
    return download(source.repo_id, revision=revision)


def _cmd_info(args: argparse.Namespace) -> int:
    print(_describe(_folder(args.source, args.revision), args.source))
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    folder = _folder(args.repo, args.revision)
    print(folder)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise ak.AdapterNotFoundError(
            f"{args.folder} is {'a file' if folder.exists() else 'missing'}: publish uploads an adapter folder "
            "written by adapterkit.save."
        )
    url = ak.publish(args.folder, args.repo, private=args.private, revision=args.revision, commit_message=args.message)
    print(url)
    return 0


RECIPES = ("text_classification", "fewshot_causal_lm", "prompting", "instruction_tuning")


def _recipe_dirs() -> list[Path]:
    return [Path.cwd() / "recipes", Path(ak.__file__).resolve().parents[1] / "recipes"]


def load_recipe(name: str) -> ModuleType:
    """The recipe script ``recipes/<name>.py`` (in the working directory, else beside the package), imported afresh."""
    for folder in _recipe_dirs():
        script = folder / f"{name}.py"
        if script.is_file():
            spec = importlib.util.spec_from_file_location(f"adapterkit_recipe_{name}", script)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
            spec.loader.exec_module(module)
            return module
    raise ak.InvalidOptionError(
        f"Unknown recipe '{name}'.{did_you_mean(name, RECIPES)} Recipes: {', '.join(RECIPES)} "
        f"(looked in {', '.join(str(d) for d in _recipe_dirs())})."
    )


def _cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    """Run a recipe by name, or the recipe a YAML/JSON config names under `recipe:`."""
    target = args.recipe
    if target is None or target in ("-h", "--help"):
        # The recipe's own parser answers `train <recipe> --help`; only a bare `train --help` lands here.
        print(args.train_parser.format_help().rstrip())
        print(f"\nrecipes: {', '.join(RECIPES)}; `adapterkit train <recipe> --help` lists a recipe's options "
              "(text_classification and fewshot_causal_lm also take --sweep KEY=V1,V2 ...).")
        if target is None and not args.train_help:
            raise ak.InvalidOptionError(f"Name a recipe ({', '.join(RECIPES)}) or a YAML/JSON config with `recipe:`.")
        return 0
    if Path(target).suffix in (".yaml", ".yml", ".json"):
        config = read_config(target)
        recipe = config.pop("recipe", None)
        if recipe is None:
            raise ak.InvalidOptionError(f"{target} names no recipe: add a top-level `recipe: <name>` ({', '.join(RECIPES)}).")
        # The recipe's options are the rest of the file: `recipe` itself is no option of it.
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(config, f)
        try:
            load_recipe(recipe).main(["--config", f.name, *extra])
        finally:
            Path(f.name).unlink(missing_ok=True)
        return 0
    load_recipe(target).main(extra)
    return 0


def _load_recorded_base(model_id: str, **kwargs):
    """load_base on the base an adapter records, with a hint for ids recorded by older versions."""
    try:
        return ak.load_base(model_id, **kwargs)
    except ak.ModelNotAvailableError as err:
        converted = [e for e in EMBEDDED_MODELS.values() if e.gguf_file and e.model_id == model_id]
        if not converted:
            raise
        # Before adapterkit recorded the alias of a converted model, adapters on it recorded the Hub id.
        raise ak.ModelNotAvailableError(
            f"{err} If the adapter was trained on the embedded {converted[0].alias!r} (a GGUF conversion of "
            f"{model_id}), pass --model {converted[0].alias}."
        ) from err


def _eval_rows(args: argparse.Namespace, label_names: list[str] | None) -> tuple:
    """The rows ``--dataset`` names (a bundled set, a local file, or a folder / Hub dataset with splits) and their labels."""
    source = resolve_source(args.dataset, what="dataset", aliases=akdata.LOCAL_SPLITS, error=ak.DataError)
    if source.kind == "alias":
        return akdata.local_dataset(args.dataset, args.split)
    split = None if source.kind == "file" else args.split  # a local file has one split
    return akdata.prepare_classification(
        akdata.load_table(str(source.path) if source.is_local else source.repo_id, split=split),
        text_column=args.text_column, label_column=args.label_column, text_pair_column=args.text_pair_column,
        label_names=label_names,
    )


def _cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a saved classification adapter (or a few-shot causal-LM one) on a dataset split."""
    folder = _folder(args.adapter, args.revision)
    sidecar = _read_adapter(folder, args.adapter) or {}
    recipe = sidecar.get("recipe") or {}
    # The recorded id is resolved by load_base: an embedded model's id finds its installed package, offline.
    model_id = args.model or (sidecar.get("base_model") or {}).get("id")
    if not model_id:
        raise ak.InvalidOptionError(f"{args.adapter} does not record its base model; pass --model.")
    classifier = sidecar.get("task") == "classification"
    # A causal-LM adapter classifies by scoring the label words its recipe trained it to say.
    words = None if classifier else recipe.get("label_words")
    if not classifier and not words:
        raise ak.InvalidOptionError(
            f"{args.adapter} is a {sidecar.get('task') or 'causal-lm'} adapter without recorded label words "
            f"(recipe {recipe.get('recipe')!r}); `adapterkit eval` scores classification adapters and few-shot "
            "causal-LM adapters trained with recipes/fewshot_causal_lm.py."
        )
    table, labels = _eval_rows(args, sidecar.get("label_names") or recipe.get("label_names"))
    table = akdata.subset(table, args.max_rows, seed=0)
    progress = sys.stderr.isatty()
    if classifier:
        model, tokenizer = _load_recorded_base(model_id, task="classification",
                                               label_names=sidecar.get("label_names") or labels)
        ak.load(model, str(folder))
        metrics = evaluate_classifier(model, tokenizer, table, max_length=args.max_length, num_labels=len(labels),
                                      show_progress=progress)
    else:
        if len(words) != len(labels):
            raise ak.InvalidOptionError(
                f"{args.adapter} was trained with {len(words)} label words {words}, but {args.dataset} has "
                f"{len(labels)} labels {labels}."
            )
        model, tokenizer = _load_recorded_base(model_id, task="causal-lm")
        ak.load(model, str(folder))
        # Scored as the recipe trained and evaluated it: plain prompts, its recorded calibration.
        defaults = PromptTemplate()  # what a recipe that recorded no prompt fields used
        template = PromptTemplate(instruction=recipe.get("instruction", defaults.instruction),
                                  text_prefix=recipe.get("text_prefix", defaults.text_prefix),
                                  answer_prefix=recipe.get("answer_prefix", defaults.answer_prefix), chat=False)
        calibration = recipe.get("calibration", "contextual")
        calibration = None if str(calibration).lower() in ("none", "false", "") else calibration
        metrics = evaluate_label_words(model, tokenizer, table, words, template=template, calibration=calibration,
                                       show_progress=progress)
    print(f"adapter   {args.adapter}\ndataset   {args.dataset} ({args.split}, {len(table)} rows)")
    print(f"accuracy  {metrics['accuracy']:.4f}\nmacro_f1  {metrics['macro_f1']:.4f}")
    if metrics.get("class_shares") is not None:
        print("shares    [" + ", ".join(f"{x:.2f}" for x in metrics["class_shares"]) + "]")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """Merge a saved adapter into its recorded base and write a plain checkpoint with a fidelity report."""
    folder = _folder(args.adapter, args.revision)
    sidecar = _read_adapter(folder, args.adapter) or {}
    texts = labels = None
    if args.dataset:
        table, _ = _eval_rows(args, sidecar.get("label_names"))
        table = akdata.subset(table, args.max_rows, seed=0)
        texts = table["text"][:]
        labels = table["label"][:] if sidecar.get("task") == "classification" else None
    report = ak.export(folder, args.out, dtype=args.dtype, texts=texts, labels=labels, max_length=args.max_length,
                       quantize=args.quantize)
    written = report.dtype + (f", {report.quantization}" if report.quantization else "")
    print(f"adapter          {args.adapter} ({report.strategy})\nwritten          {report.folder} ({written})")
    print(f"rows             {report.rows}\ntop-1 agreement  {report.top1_agreement:.4f}\n"
          f"mean KL          {report.mean_kl:.2e}\nmax logit diff   {report.max_abs_logit_diff:.2e}")
    if report.accuracy_delta is not None:
        print(f"accuracy         {report.unmerged_accuracy:.4f} unmerged, {report.merged_accuracy:.4f} merged")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Attach each built-in strategy to a base model and print its summary."""
    for strategy in args.strategies:
        model, _ = ak.load_base(args.model, task=args.task, bits=args.bits)
        ak.attach(model, strategy, name=strategy)
        print(f"--- {strategy} on {args.model}")
        print(ak.summary(model))
    return 0


class _Parser(argparse.ArgumentParser):
    """Refuses abbreviated flags (subcommand parsers are of this class too): `--max-row` is not `--max-rows`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``adapterkit`` command."""
    parser = _Parser(prog="adapterkit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list strategies (and cached adapters)")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("info", help="describe a saved adapter (folder or Hub repo)")
    p.add_argument("source")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("pull", help="download an adapter into the Hub cache and print its folder")
    p.add_argument("repo")
    p.add_argument("--revision", default=None)
    p.set_defaults(func=_cmd_pull)
    p = sub.add_parser("publish", help="upload a saved adapter folder to the Hub in one commit")
    p.add_argument("folder")
    p.add_argument("repo")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None)
    p.add_argument("--message", default=None)
    p.set_defaults(func=_cmd_publish)
    # add_help=False: `train <recipe> --help` belongs to the recipe, whose parser shows its options.
    p = sub.add_parser("train", help="run a recipe (by name, or a config naming it) with flag overrides",
                       add_help=False, usage="adapterkit train <recipe|config.yaml> [--option value ...]")
    p.add_argument("recipe", nargs="?", help=f"one of {', '.join(RECIPES)}, or a YAML/JSON config with `recipe:`")
    p.set_defaults(func=_cmd_train, takes_extra=True, train_parser=p)
    p = sub.add_parser("eval", help="evaluate a saved classification adapter on a dataset")
    p.add_argument("adapter", help="adapter folder or Hub repo id")
    p.add_argument("--dataset", default="sst2")
    p.add_argument("--split", default="dev")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter records)")
    p.add_argument("--revision", default=None)
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--text-pair-column", default=None, help="second text of sentence-pair tasks")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("export", help="merge a saved adapter into its base: a plain checkpoint and a fidelity report")
    p.add_argument("adapter", help="adapter folder or Hub repo id")
    p.add_argument("out", help="folder to write (new, empty, or an earlier export)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int8"],
                   help="re-quantize the merged weights with bitsandbytes (the report measures the quantized export)")
    p.add_argument("--revision", default=None)
    p.add_argument("--dataset", default=None, help="rows for the fidelity report (default: a few fixed sentences)")
    p.add_argument("--split", default="dev")
    p.add_argument("--max-rows", type=int, default=200)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--text-pair-column", default=None)
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("demo", help="attach strategies to a base model and print summaries")
    p.add_argument("model", nargs="?", default="minilm-l6")
    p.add_argument("--task", default=None)
    p.add_argument("--bits", type=int, default=None, choices=[4, 8])
    p.add_argument("--strategies", nargs="+", default=["lora", "prefix", "head", "full"])
    p.set_defaults(func=_cmd_demo)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``adapterkit`` console command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Only `train` passes flags on, to its recipe, which refuses the ones it does not know.
    if getattr(args, "takes_extra", False):
        args.debug = args.debug or "--debug" in extra
        args.train_help = any(a in ("-h", "--help") for a in extra)
        extra = [a for a in extra if a != "--debug"]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with contextlib.ExitStack() as stack:
            if args.command == "train":
                # Hints in a recipe's errors name its flags (`--max-length 64`), not Python keywords; `eval`
                # has other flags and spells its own hints.
                stack.enter_context(cli_spelling())
            return args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)
    except (ak.AdapterKitError, OSError) as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
