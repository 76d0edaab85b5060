"""Regenerate ``service/record/story_pb2.py`` from ``proto/emu3p5/story.proto``.

Usage (from anywhere; paths are resolved against the repository root)::

    python scripts/gen_proto.py            # rewrite service/record/story_pb2.py
    python scripts/gen_proto.py --check    # exit 1 if the committed module drifted

Needs ``grpcio-tools`` (a test/dev dependency, not a runtime one).

protoc's output is post-processed in two deterministic ways so that the committed module
fits this package:

1. The module name passed to ``BuildTopDescriptorsAndMessages`` (which becomes the
   ``__module__`` of every generated class) is ``service.record.story_pb2`` rather than the
   ``emu3p5.story_pb2`` protoc derives from the .proto path; otherwise pickling a message
   would try to import a top-level ``emu3p5`` package that does not exist. The module
   imports nothing but ``google.protobuf`` either way.
2. The ``runtime_version.ValidateProtobufRuntimeVersion`` guard is removed. It pins the
   runtime to ">= the protoc that grpcio-tools happens to bundle" (7.35.1 today), while this
   file only uses ``AddSerializedFile`` + ``internal.builder``, which every protobuf >= 5.26
   provides (``tests/test_record_proto.py`` checks the module loads; it was also checked by
   hand against protobuf 5.26.1 and 6.x). This keeps the ``protobuf>=5.26`` floor in
   pyproject valid (vLLM / Ascend images ship older protobuf than the dev venv).

The descriptor itself (names, numbers, types) is never touched: the drift test compares
it against a fresh protoc compile of the .proto.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_REL = "emu3p5/story.proto"
MODULE_PATH = REPO_ROOT / "service" / "record" / "story_pb2.py"
MODULE_NAME = "service.record.story_pb2"

_HEADER_NOTE = (
    "# Post-processed by `python scripts/gen_proto.py` (module name set to\n"
    f"# {MODULE_NAME}; runtime-version guard removed so protobuf>=5.26 can load it).\n"
)

_VERSION_IMPORT_RE = re.compile(
    r"^from google\.protobuf import runtime_version as _runtime_version\n", re.M
)
_VERSION_CALL_RE = re.compile(
    r"^_runtime_version\.ValidateProtobufRuntimeVersion\(\n(?:[ \t].*\n)*?\)\n", re.M
)


def _protoc(args: list[str]) -> None:
    from grpc_tools import protoc  # dev/test dependency; imported lazily

    rc = protoc.main(["grpc_tools.protoc", f"-I{PROTO_ROOT}", *args])
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc} (args: {args})")


def compile_descriptor_set() -> bytes:
    """Compile the .proto with protoc and return the serialized ``FileDescriptorSet``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "story.desc"
        _protoc([f"--descriptor_set_out={out}", str(PROTO_ROOT / PROTO_REL)])
        return out.read_bytes()


def postprocess(source: str) -> str:
    """Apply the two documented rewrites to protoc's Python output."""
    generated_name = PROTO_REL[: -len(".proto")].replace("/", ".") + "_pb2"
    needle = f"'{generated_name}'"
    if source.count(needle) != 1:
        raise RuntimeError(f"expected exactly one {needle} in protoc output")
    source = source.replace(needle, f"'{MODULE_NAME}'")
    # Older protoc versions emit no version guard; newer ones emit exactly one.
    source, n_import = _VERSION_IMPORT_RE.subn("", source)
    source, n_call = _VERSION_CALL_RE.subn("", source)
    if (n_import, n_call) not in {(0, 0), (1, 1)}:
        raise RuntimeError("could not strip the protobuf runtime-version guard cleanly")
    if "_runtime_version" in source:
        raise RuntimeError("leftover reference to _runtime_version in generated code")
    marker = '"""Generated protocol buffer code."""\n'
    if marker in source:
        source = source.replace(marker, _HEADER_NOTE + marker, 1)
    else:
        source = _HEADER_NOTE + source
    return source


def generate_source() -> str:
    """Run protoc and return the post-processed module source."""
    with tempfile.TemporaryDirectory() as tmp:
        _protoc([f"--python_out={tmp}", str(PROTO_ROOT / PROTO_REL)])
        raw = (Path(tmp) / PROTO_REL.replace(".proto", "_pb2.py")).read_text(encoding="utf-8")
    return postprocess(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/gen_proto.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=MODULE_PATH, help="where to write the module")
    parser.add_argument(
        "--check",
        action="store_true",
        help="do not write; exit 1 when the module's descriptor differs from a fresh compile",
    )
    args = parser.parse_args(argv)
    if args.check:
        from google.protobuf import descriptor_pb2

        from service.record import story_pb2

        fresh = descriptor_pb2.FileDescriptorSet.FromString(compile_descriptor_set()).file[0]
        committed = descriptor_pb2.FileDescriptorProto()
        story_pb2.DESCRIPTOR.CopyToProto(committed)
        if normalise(fresh) != normalise(committed):
            print(f"{MODULE_PATH} is out of date; run: python scripts/gen_proto.py", file=sys.stderr)
            return 1
        print("story_pb2 is up to date")
        return 0
    args.out.write_text(generate_source(), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


def normalise(fdp):
    """Copy of a FileDescriptorProto without what protoc adds but gencode drops (json_name)."""
    from google.protobuf import descriptor_pb2

    out = descriptor_pb2.FileDescriptorProto()
    out.CopyFrom(fdp)
    out.ClearField("source_code_info")

    def strip(messages):
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            strip(m.nested_type)

    strip(out.message_type)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
