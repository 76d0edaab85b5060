"""Write a Story record (``.pb``) out as plain files, optionally with a slideshow video.

CLI (wired by the lead as ``python -m service vis``; also ``python -m service.record.visualise``)::

    python -m service vis RECORD.pb --out DIR [--video]
    python -m service vis RECORDS_DIR --out DIR [--video]

A file is written straight into ``--out``. A directory is scanned recursively for ``*.pb``;
each record goes to ``--out/<relative dir>/<stem>/`` so equal stems in different folders
do not collide.

Layout of one record (docs/design.md §7):

=========================  ===========================================================
``000_question.txt``       ``Story.question`` (always written, may be empty)
``000_global_cot.txt``     ``Story.summary``; only when non-empty
``000_MM_reference.png``   reference image MM (00, 01, ...); an addition to the design notes (docs/design.md §7)
``NNN_text.txt``           clip NNN's text; only when non-empty (an image-first clip of a
                           T2I answer has none)
``NNN_MM_image.png``       image MM (from 00) of clip NNN
``NNN_MM_image_cot.txt``   that image's ``chain_of_thought``; only when non-empty
``video.mp4``              with ``--video`` and at least one image
=========================  ===========================================================

Clips are numbered NNN = 001, 002, ... in record order (000 is reserved for the question,
the global CoT and the reference images). Records from elsewhere may hold several segments
per clip: their ``asr`` texts are joined with newlines into ``NNN_text.txt`` and their images
are numbered MM consecutively across the clip. Images are written as PNG: PNG payloads are
copied byte for byte, other formats are decoded and re-encoded; an image with no
``image_data`` (only ``image_path``) is skipped with a warning.

The video has one frame per generated image (reference images excluded), held for
``--seconds-per-image`` seconds (fps = 1/seconds), the clip's text wrapped in a panel below
the image; all frames share one size, padded to multiples of 16 (even, as yuv420p needs).
"""

from __future__ import annotations

import argparse
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from . import story_pb2

__all__ = ["load_story", "write_story", "write_video", "vis_main", "VideoFrame"]

_MAX_VIDEO_SIDE = 768  # images larger than this are scaled down in the video
_TEXT_MARGIN = 12
_MAX_TEXT_LINES = 24
_BLOCK = 16


def load_story(path: str | Path) -> story_pb2.Story:
    return story_pb2.Story.FromString(Path(path).read_bytes())


@dataclass
class VideoFrame:
    image: PILImage.Image
    text: str


def _clip_text(clip: story_pb2.Clip) -> str:
    return "\n".join(seg.asr for seg in clip.segments if seg.asr)


def _iter_clip_images(clip: story_pb2.Clip) -> Iterator[story_pb2.ImageMeta]:
    for seg in clip.segments:
        yield from seg.images


def _png_bytes(meta: story_pb2.ImageMeta) -> bytes | None:
    img = meta.image
    if not img.image_data:
        return None
    if img.format == story_pb2.PNG or img.image_data[:8] == b"\x89PNG\r\n\x1a\n":
        return bytes(img.image_data)
    with PILImage.open(io.BytesIO(img.image_data)) as pil:
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        return buf.getvalue()


def _write_text(path: Path, text: str, written: list[Path]) -> None:
    path.write_text(text, encoding="utf-8")
    written.append(path)


def write_story(
    story: story_pb2.Story,
    out_dir: str | Path,
    video: bool = False,
    seconds_per_image: float = 2.0,
) -> list[Path]:
    """Write ``story`` into ``out_dir`` (created if needed); returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    frames: list[VideoFrame] = []

    _write_text(out / "000_question.txt", story.question, written)
    if story.summary:
        _write_text(out / "000_global_cot.txt", story.summary, written)
    for mm, meta in enumerate(story.reference_images):
        data = _png_bytes(meta)
        if data is None:
            print(f"warning: reference image {mm} has no image_data; skipped", file=sys.stderr)
            continue
        path = out / f"000_{mm:02d}_reference.png"
        path.write_bytes(data)
        written.append(path)

    for ci, clip in enumerate(story.clips):
        nnn = f"{ci + 1:03d}"
        text = _clip_text(clip)
        if text:
            _write_text(out / f"{nnn}_text.txt", text, written)
        for mm, meta in enumerate(_iter_clip_images(clip)):
            data = _png_bytes(meta)
            if data is None:
                print(f"warning: clip {nnn} image {mm} has no image_data; skipped", file=sys.stderr)
                continue
            path = out / f"{nnn}_{mm:02d}_image.png"
            path.write_bytes(data)
            written.append(path)
            if meta.chain_of_thought:
                _write_text(out / f"{nnn}_{mm:02d}_image_cot.txt", meta.chain_of_thought, written)
            if video:
                with PILImage.open(io.BytesIO(data)) as pil:
                    frames.append(VideoFrame(pil.convert("RGB"), text))

    if video:
        if frames:
            path = out / "video.mp4"
            write_video(frames, path, seconds_per_image=seconds_per_image)
            written.append(path)
        else:
            print(f"warning: {out}: no images, no video written", file=sys.stderr)
    return written


# --------------------------------------------------------------------------- video rendering


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=16)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def _drawable(text: str, font) -> str:
    """The bitmap fallback font only encodes latin-1; replace what it cannot draw."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy wrap to ``width`` pixels; words longer than a line (or CJK runs) break anywhere."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            candidate = word if not line else line + " " + word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # the word alone does not fit: break by character
                if draw.textlength(line + ch, font=font) <= width or not line:
                    line += ch
                else:
                    lines.append(line)
                    line = ch
        lines.append(line)
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > _MAX_TEXT_LINES:
        lines = lines[: _MAX_TEXT_LINES - 1] + ["..."]
    return lines


def _round_up(x: int, m: int = _BLOCK) -> int:
    return max(m, -(-x // m) * m)


def _scaled(img: PILImage.Image) -> PILImage.Image:
    w, h = img.size
    scale = min(1.0, _MAX_VIDEO_SIDE / max(w, h))
    if scale < 1.0:
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), PILImage.BICUBIC)
    return img


def render_frames(frames: Sequence[VideoFrame]) -> list[PILImage.Image]:
    """Compose image + wrapped text panel for each frame; all outputs share one even size."""
    font = _font()
    images = [_scaled(f.image) for f in frames]
    img_w = max(i.width for i in images)
    img_h = max(i.height for i in images)
    panel_w = max(img_w, 320)
    text_w = panel_w - 2 * _TEXT_MARGIN
    probe = ImageDraw.Draw(PILImage.new("RGB", (1, 1)))
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 3)
    line_h = ascent + descent + 4
    wrapped = [_wrap(_drawable(f.text, font), font, text_w, probe) for f in frames]
    n_lines = max((len(w) for w in wrapped), default=0)
    text_h = 2 * _TEXT_MARGIN + n_lines * line_h if n_lines else 0
    width = _round_up(panel_w)
    height = _round_up(img_h + text_h)

    out = []
    for img, lines in zip(images, wrapped):
        canvas = PILImage.new("RGB", (width, height), (0, 0, 0))
        canvas.paste(img, ((width - img.width) // 2, (img_h - img.height) // 2))
        draw = ImageDraw.Draw(canvas)
        y = img_h + _TEXT_MARGIN
        for line in lines:
            draw.text((_TEXT_MARGIN + (width - panel_w) // 2, y), line, fill=(255, 255, 255), font=font)
            y += line_h
        out.append(canvas)
    return out


def write_video(frames: Sequence[VideoFrame], path: str | Path, seconds_per_image: float = 2.0) -> None:
    """Encode one video frame per entry of ``frames`` (H.264, yuv420p) with imageio-ffmpeg."""
    import imageio_ffmpeg  # lazily: only the --video path needs ffmpeg

    rendered = render_frames(frames)
    size = rendered[0].size
    writer = imageio_ffmpeg.write_frames(
        str(path),
        size,
        fps=1.0 / seconds_per_image,
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=_BLOCK,
        ffmpeg_log_level="error",
    )
    writer.send(None)  # start the generator
    try:
        for frame in rendered:
            writer.send(frame.tobytes())
    finally:
        writer.close()


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service vis",
        description="Write Emu3.5 Story records (.pb) out as text/PNG files (and a video).",
    )
    p.add_argument("record", type=Path, help="a .pb record, or a directory scanned recursively for *.pb")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--video", action="store_true", help="also write video.mp4 (one frame per image)")
    p.add_argument("--seconds-per-image", type=float, default=2.0, help="video: how long each image shows")
    return p


def vis_main(argv: list[str]) -> int:
    """Entry point of ``python -m service vis``; returns the process exit code."""
    args = _parser().parse_args(argv)
    if args.seconds_per_image <= 0:
        print("error: --seconds-per-image must be > 0", file=sys.stderr)
        return 2
    src: Path = args.record
    if src.is_dir():
        jobs = [(pb, args.out / pb.relative_to(src).parent / pb.stem) for pb in sorted(src.rglob("*.pb"))]
        if not jobs:
            print(f"error: no *.pb files under {src}", file=sys.stderr)
            return 1
    elif src.is_file():
        jobs = [(src, args.out)]
    else:
        print(f"error: {src} does not exist", file=sys.stderr)
        return 1

    failures = 0
    for pb, out in jobs:
        try:
            story = load_story(pb)
            write_story(story, out, video=args.video, seconds_per_image=args.seconds_per_image)
        except Exception as exc:  # noqa: BLE001 - keep going over a directory; report at the end
            failures += 1
            print(f"error: {pb}: {type(exc).__name__}: {exc}", file=sys.stderr)
        else:
            print(f"{pb} -> {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(vis_main(sys.argv[1:]))
