"""The generation record: the ``emu3p5.story`` protobuf (docs/design.md §7) and its builder.

The visualiser lives in ``service.record.visualise`` (CLI entry ``vis_main``); it is not
imported here so that ``python -m service.record.visualise`` runs without a runpy warning.

``story_pb2`` is generated from ``proto/emu3p5/story.proto`` by ``python scripts/gen_proto.py``.
"""

from . import story_pb2
from .builder import (
    RecordGlobalCot,
    RecordImage,
    RecordImageCot,
    RecordItem,
    RecordText,
    StoryBuilder,
    build_story,
    encode_png,
)

__all__ = [
    "story_pb2",
    "RecordText",
    "RecordGlobalCot",
    "RecordImageCot",
    "RecordImage",
    "RecordItem",
    "StoryBuilder",
    "build_story",
    "encode_png",
]
