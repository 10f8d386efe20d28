"""Real weights through the real loaders: diffusers folders, Self-Forcing-style checkpoints, `instrument render`."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import need_tool
from instrument import cli
from instrument.engine.default import build_components

# diffusers name -> original Wan name: the inverse of diffusers' converter, written out so the test
# checks the loader against an independent statement of the layout.
TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
    (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".o."),
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
]


def original_layout(state):
    out = {}
    for k, v in state.items():
        if k == "scale_shift_table":
            k = "head.modulation"
        elif k.startswith("proj_out."):
            k = k.replace("proj_out.", "head.head.")
        else:
            k = k.replace(".scale_shift_table", ".modulation")
            for a, b in TO_ORIGINAL:
                k = k.replace(a, b)
            # diffusers' norm2 is the original cross-attention norm3
            k = k.replace(".norm2.", ".norm3.")
        out["model." + k] = v.clone()
    return out


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "instrument.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def decoded_frames(path):
    need_tool("ffmpeg")
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                          capture_output=True, check=True).stdout


def frame_count(path):
    need_tool("ffprobe")
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0", "-show_entries",
                          "stream=nb_read_frames,width,height", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    s = json.loads(out)["streams"][0]
    return int(s["nb_read_frames"]), s["width"], s["height"]


@pytest.fixture(scope="module")
def other_folder(default_folder, tmp_path_factory):
    """The default folder with another transformer (seed 99): what the checkpoint should turn it into."""
    folder = tmp_path_factory.mktemp("wan-b") / "Wan-tiny-b"
    shutil.copytree(default_folder, folder)
    shutil.rmtree(folder / "transformer")
    build_components(seed=99)[0].save_pretrained(folder / "transformer")
    return folder


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_checkpoint_in_original_layout_gives_the_frames_of_its_folder(default_folder, other_folder, tmp_path, fmt):
    """Folder A + checkpoint of B's transformer (original names, nested, prefixed) renders as folder B."""
    state = build_components(seed=99)[0].state_dict()
    orig = original_layout(state)
    assert not any(".attn1." in k or ".to_q." in k for k in orig)
    ckpt = tmp_path / f"generator.{fmt}"
    if fmt == "pt":
        torch.save({"generator_ema": orig, "step": torch.tensor(1000)}, ckpt)
    else:
        save_file(orig, str(ckpt))
    a = tmp_path / "a.mp4"
    b = tmp_path / "b.mp4"
    r1 = run_cli("render", "--out", str(a), "--frames", "9", "--model", str(default_folder), "--checkpoint",
                 str(ckpt), "--device", "cpu", "--size", "64x64")
    assert r1.returncode == 0, r1.stderr
    r2 = run_cli("render", "--out", str(b), "--frames", "9", "--model", str(other_folder), "--device", "cpu",
                 "--size", "64x64")
    assert r2.returncode == 0, r2.stderr
    assert decoded_frames(a) == decoded_frames(b)
    assert "applying" in r1.stderr and "reading checkpoint" in r1.stderr  # progress shown


def test_render_writes_n_frames_deterministically(tmp_path, main_here):
    a, b, c = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"
    args = ("render", "--frames", "14", "--chunk", "1", "--device", "cpu")
    r = run_cli(*args, "--out", str(a), "--seed", "4")  # one in its own process, the others in this one
    assert r.returncode == 0, r.stderr
    assert main_here(cli.main, *args, "--out", b, "--seed", "4").returncode == 0
    assert frame_count(a) == (14, 128, 128)
    assert decoded_frames(a) == decoded_frames(b)
    assert main_here(cli.main, *args, "--out", c, "--seed", "5").returncode == 0
    assert decoded_frames(a) != decoded_frames(c)


def one_clear_line(result, *needles):
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert any(all(n in line for n in needles) for line in err), result.stderr


def test_bad_paths_and_files_give_one_clear_line(tmp_path, default_folder, main_here):
    out = str(tmp_path / "x.mp4")
    one_clear_line(run_cli("render", "--out", out, "--frames", "1", "--model", str(tmp_path / "nope")),
                   "nope", "no such folder")
    (tmp_path / "empty").mkdir()
    one_clear_line(main_here(cli.main, "render", "--out", out, "--frames", "1", "--model", str(tmp_path / "empty")),
                   "missing", "model_index.json")
    one_clear_line(main_here(cli.main, "render", "--out", out, "--frames", "1", "--checkpoint", str(tmp_path / "no.pt")),
                   "no.pt", "no such file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint at all")
    one_clear_line(main_here(cli.main, "render", "--out", out, "--frames", "1", "--checkpoint", str(junk)),
                   "junk.pt", "not a readable checkpoint")
    partial = tmp_path / "partial.safetensors"
    state = original_layout(build_components()[0].state_dict())
    state.pop(next(k for k in state if "self_attn.q.weight" in k))
    state["model.extra.weight"] = torch.zeros(1)
    save_file(state, str(partial))
    one_clear_line(main_here(cli.main, "render", "--out", out, "--frames", "1", "--model", str(default_folder),
                           "--checkpoint", str(partial)),
                   "partial.safetensors", "1 missing", "1 unexpected")
    # A pickle that would run code is refused by weights_only loading.
    evil = tmp_path / "evil.pt"
    evil.write_bytes(b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c"
                     b"\x04true\x94\x85\x94R\x94.")
    one_clear_line(main_here(cli.main, "render", "--out", out, "--frames", "1", "--checkpoint", str(evil)),
                   "evil.pt", "not a readable checkpoint")
    one_clear_line(main_here(cli.main, "render", "--out", out, "--frames", "1", "--size", "100x64"), "--size", "multiples")
    one_clear_line(main_here(cli.main, "render", "--out", str(tmp_path / "no" / "x.mp4"), "--frames", "1"), "does not exist")


def test_a_random_model_streams_its_configuration_with_either_decoder(monkeypatch):
    """--model random:CONFIG: Wan's real configuration with random weights (here its 1.3B entry shrunk to two
    layers, so the test stays small): the DiT has the configured shape, the text encoder umT5's width, the
    decoders are the Wan VAE and, without a TAEHV file, a random TAEHV; the stream runs and makes frames."""
    from instrument.engine import loading
    from instrument.engine.stream import Engine
    from instrument.errors import UserError

    monkeypatch.setitem(loading.WAN_CONFIGS, "1.3b", dict(num_attention_heads=2, ffn_dim=64, num_layers=2))
    said = []
    for decoder in ("wan", "tiny"):
        engine = Engine.load("random:1.3b", device="cpu", decoder=decoder, progress=said.append)
        t = engine.components.transformer
        assert engine.components.source == "random Wan2.1 1.3b" and len(t.blocks) == 2
        assert t.config.num_attention_heads * t.config.attention_head_dim == 256 and t.config.text_dim == 4096
        stream = engine.stream("a red circle", seed=1, size=(64, 48), chunk=1)
        frames = [stream.next().frames for _ in range(2)]
        assert frames[0].shape == (1, 48, 64, 3) and frames[1].shape == (4, 48, 64, 3)
        assert engine.default_size == (832, 480)
    assert "building Wan2.1 1.3b with random weights on cpu" in said
    assert "tiny decoder: TAEHV with random weights" in said
    with pytest.raises(UserError, match=r"--model random:7b: expected random:1\.3b or random:14b"):
        Engine.load("random:7b", device="cpu", progress=said.append)
