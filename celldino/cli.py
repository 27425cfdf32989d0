"""The `celldino` command. Each subcommand lives in the module that owns it; that module provides
`add_arguments(parser)` and `main(args) -> int | None`.

    celldino demo                      pretrain a small ViT on the bundled sample, then kNN-evaluate it (CPU ok)
    celldino train --config-file X --output-dir Y [key=value ...]
    celldino submit ...                the same on SLURM (submitit)
    celldino embed --checkpoint C --input DIR|CSV --output x.npy|x.h5ad
    celldino eval knn|linear ...       reference evaluation protocols
    celldino export ...                teacher backbone -> safetensors / reference .pth
    celldino bench [all|attention|...] benchmarks against their baselines, CSV + report
    celldino info                      versions, devices, kernels and extensions available
"""
import argparse
import importlib
import sys

# name -> (module, help); eval has its own sub-subcommands
COMMANDS = {
    "demo": ("celldino.demo", "pretrain on the bundled sample cells, then kNN-evaluate (a few minutes on CPU)"),
    "train": ("celldino.train.launch", "self-supervised Cell-DINO / DINOv2 pretraining (torchrun-aware)"),
    "submit": ("celldino.train.submit", "launch `train` on SLURM with submitit"),
    "embed": ("celldino.eval.embed", "embeddings of your images from any checkpoint (.npy or .h5ad)"),
    "export": ("celldino.hub", "export a trained teacher backbone as safetensors and reference-format .pth"),
    "bench": ("celldino.benchmarks.run_all", "run benchmarks against their baselines in the same run"),
    "info": ("celldino.info", "versions, devices, kernels and extensions available"),
}
EVAL_COMMANDS = {
    "knn": ("celldino.eval.knn_cli", "kNN evaluation (reference protocol, mean per-class F1)"),
    "linear": ("celldino.eval.linear_cli", "linear-probe evaluation (reference protocol)"),
}


def _register(subparsers, name, module_name, help_text):
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if getattr(exc, "name", None) != module_name:
            raise
        parser.set_defaults(_missing=f"`celldino {name}` is not available in this install ({exc})")
        return
    module.add_arguments(parser)
    parser.set_defaults(_main=module.main)


def build_parser():
    parser = argparse.ArgumentParser(prog="celldino", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        _register(subparsers, name, module_name, help_text)
    eval_parser = subparsers.add_parser("eval", help="evaluate a checkpoint: knn | linear")
    eval_sub = eval_parser.add_subparsers(dest="eval_command", metavar="PROTOCOL")
    for name, (module_name, help_text) in EVAL_COMMANDS.items():
        _register(eval_sub, name, module_name, help_text)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"celldino: {args._missing}", file=sys.stderr)
        return 2
    if not hasattr(args, "_main"):
        parser.print_help()
        return 2
    return args._main(args) or 0


if __name__ == "__main__":
    sys.exit(main())
