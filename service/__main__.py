"""Command line: ``python -m service {make-tiny,vis,serve,generate,quantize}`` (``emu35-serve`` runs
``serve``, ``emu35-generate`` runs ``generate``)."""

from __future__ import annotations

import argparse
import sys


def _make_tiny(argv: list[str]) -> int:
    from service.tiny.make import make_tiny

    parser = argparse.ArgumentParser(prog="python -m service make-tiny", description=make_tiny.__doc__)
    parser.add_argument("out_dir", help="folder to write model/, tokenizer/ and vq/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    parser.add_argument("--flashar", action="store_true", help="also write flashar/, a tiny FlashAR checkpoint")
    args = parser.parse_args(argv)
    out = make_tiny(args.out_dir, seed=args.seed, force=args.force, flashar=args.flashar)
    print(out)
    return 0


def _vis(argv: list[str]) -> int:
    from service.record.visualise import vis_main

    return vis_main(argv)


def _demo_settings(settings):
    """``--demo``: build (once, cached) the tiny checkpoints and serve them. The trainer is imported here,
    in the command line, so the serving path never imports it."""
    if not settings.demo:
        return settings
    import logging
    import time

    from service.tiny.make import ensure_tiny, ensure_tiny_flashar

    started = time.monotonic()
    tiny = ensure_tiny()
    if settings.flashar:
        ensure_tiny_flashar(tiny)
    logging.getLogger("service.server").info("demo: tiny checkpoints in %s (%.1f s)", tiny, time.monotonic() - started)
    return settings.with_demo_defaults(tiny)


def _serve(argv: list[str]) -> int:
    from service.server.run import serve_main

    return serve_main(argv, prepare=_demo_settings)


def _generate(argv: list[str]) -> int:
    from service.batch.cli import generate_main

    return generate_main(argv, prepare=_demo_settings)


def _quantize(argv: list[str]) -> int:
    from service.quant.quantize import quantize_main

    return quantize_main(argv)


COMMANDS = {"make-tiny": _make_tiny, "vis": _vis, "serve": _serve, "generate": _generate, "quantize": _quantize}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m service {" + ",".join(COMMANDS) + "} [args]", file=sys.stderr)
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])


def serve_entry() -> int:
    """The ``emu35-serve`` console script: ``python -m service serve`` with the same arguments."""
    return _serve(sys.argv[1:])


def generate_entry() -> int:
    """The ``emu35-generate`` console script: ``python -m service generate`` with the same arguments."""
    return _generate(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
