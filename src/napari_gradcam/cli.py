"""The ``napari-gradcam`` command."""

from __future__ import annotations

import argparse
import sys


def _example(args) -> int:
    from ._example import run_example

    run_example(methods=args.method or None, device=args.device, seed=args.seed)
    return 0


def _demo(args) -> int:
    from ._napari.demo import run_demo

    return run_demo(stack=args.stack, methods=args.method or None, device=args.device,
                    screenshot=args.screenshot)


def _method_and_device(parser, default: str) -> None:
    from .cam import available_methods

    parser.add_argument("--method", action="append", choices=available_methods(),
                        help=f"method to run (repeatable; {default})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-gradcam",
        description="Class activation maps (CAM, Grad-CAM and family) for napari and scripts.",
    )
    sub = parser.add_subparsers(dest="command")
    ex = sub.add_parser(
        "example",
        help="run every CAM method with the bundled demo model on a synthetic image and print "
             "what it found next to the truth",
    )
    _method_and_device(ex, "default: all")
    ex.add_argument("--seed", type=int, default=6, help="which synthetic image (default 6)")
    ex.set_defaults(func=_example)
    demo = sub.add_parser(
        "demo",
        help="open napari with a synthetic sample and the bundled model, run Grad-CAM and show "
             "the heatmap and the editable regions",
    )
    _method_and_device(demo, "one heatmap layer each; default gradcam")
    demo.add_argument("--stack", action="store_true",
                      help="use the 16-frame synthetic stack instead of the single image")
    demo.add_argument("--screenshot", metavar="PNG",
                      help="save a picture of the window after the run, then close")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:  # errors a user can cause: one clear sentence
        print(f"napari-gradcam: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
