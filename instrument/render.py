"""`instrument render`: stream a fixed number of frames to a video file, headless and deterministic."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from .errors import UserError
from .progress import Progress

FPS = 16  # Wan's own frame rate
DEFAULT_PROMPT = "a red circle moving over a blue background"


def prompt_and_seed(args, engine) -> tuple[str, int]:
    """The command line wins, then the patch, then the defaults."""
    patch = getattr(engine, "patch", None)
    prompt = args.prompt or (patch.prompt if patch is not None and patch.prompt else DEFAULT_PROMPT)
    seed = args.seed if args.seed is not None else (patch.seed if patch is not None and patch.seed is not None else 0)
    return prompt, seed


def add_engine_arguments(p) -> None:
    """Arguments every command that builds an engine shares (render, play, bench)."""
    p.add_argument("--model", metavar="DIR", help="diffusers-format Wan 2.1 T2V folder (default: the embedded model); "
                   "random:1.3b or random:14b: that configuration with random weights (noise pictures, real speed)")
    p.add_argument("--checkpoint", metavar="FILE", help="causal generator checkpoint (Self-Forcing, CausVid, LongLive)")
    p.add_argument("--decoder", choices=("wan", "tiny"), default="wan", help="frame decoder (default wan)")
    p.add_argument("--tiny-decoder", metavar="FILE", help="TAEHV weights for --decoder tiny (taew2_1.pth)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--size", type=parse_size, default=None, metavar="WxH", help="frame size, multiples of 16")
    p.add_argument("--chunk", type=int, choices=(1, 3), default=3, help="latent frames per chunk")
    p.add_argument("--sink", type=int, default=3, help="latent frames kept for ever in the KV cache (default 3)")
    p.add_argument("--window", type=int, default=12,
                   help="latent frames of the rolling KV window, the current chunk included (default 12)")
    p.add_argument("--prompt", default=None, help=f"prompt (default: the patch's, else '{DEFAULT_PROMPT}')")
    p.add_argument("--seed", type=int, default=None, help="noise seed (default: the patch's, else 0)")
    p.add_argument("--patch", metavar="FILE", help="performance patch (TOML) with bends")
    p.add_argument("--overlap-decode", action="store_true",
                   help="decode each chunk on a second CUDA stream while the next chunk's DiT runs")
    p.add_argument("--fp8", action="store_true",
                   help="run the DiT blocks' linear layers in FP8 (e4m3; Ada/Hopper GPUs): faster, slightly less exact")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text}: expected WIDTHxHEIGHT, e.g. 832x480") from None
    return w, h


def engine_from_args(args, progress):
    import torch

    from .engine.stream import Engine

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine.load(model=args.model, checkpoint=args.checkpoint, device=device, decoder=args.decoder,
                         tiny_decoder=args.tiny_decoder, progress=progress, fp8=args.fp8)
    if getattr(args, "patch", None):
        from .bends.patch import apply_patch_file

        apply_patch_file(engine, args.patch, progress)
    return engine


def configure(p) -> None:
    add_engine_arguments(p)
    p.add_argument("--out", required=True, metavar="FILE.mp4", help="video file to write")
    p.add_argument("--frames", type=int, required=True, help="number of frames to write")


def run(args) -> int:
    if args.frames <= 0:
        raise UserError("--frames must be at least 1")
    out = Path(args.out)
    if not out.parent.exists():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if shutil.which("ffmpeg") is None:
        raise UserError("ffmpeg not found on PATH (install it: apt-get install ffmpeg)")
    progress = Progress()
    engine = engine_from_args(args, progress)
    prompt, seed = prompt_and_seed(args, engine)
    stream = engine.stream(prompt, seed=seed, size=args.size, chunk=args.chunk, sink=args.sink, window=args.window,
                           overlap_decode=args.overlap_decode)
    w, h = stream.settings.width, stream.settings.height
    writer = VideoWriter(out, w, h, FPS)
    written, start = 0, time.monotonic()
    try:
        while written < args.frames:
            chunk = stream.next()
            frames = chunk.frames[: args.frames - written]
            writer.write(frames.numpy())
            written += frames.shape[0]
            rate = written / max(time.monotonic() - start, 1e-9)
            progress(f"frame {written}/{args.frames} ({rate:.1f} fps)")
    finally:
        writer.close()
    progress(f"wrote {written} frames ({w}x{h}, {FPS} fps) to {out}")
    return 0


class VideoWriter:
    """Every frame, in order, through ffmpeg (render must not drop frames, unlike the live recorder)."""

    def __init__(self, path: Path, width: int, height: int, fps: int):
        from .stage.recorder import encoder_args

        cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{width}x{height}", "-r", str(fps), "-i", "-", *encoder_args(), str(path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def write(self, frames) -> None:
        try:
            self.proc.stdin.write(frames.tobytes())
        except BrokenPipeError:
            raise UserError(f"ffmpeg stopped: {self.proc.stderr.read().decode(errors='replace').strip()}") from None

    def close(self) -> None:
        self.proc.stdin.close()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        if self.proc.wait() != 0:
            raise UserError(f"ffmpeg failed: {err}")
