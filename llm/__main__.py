"""``python -m llm``: LLaMA inference on the emulated wafer."""
from meshmpi import cli

from .generate import build_parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    cli.run(main)
