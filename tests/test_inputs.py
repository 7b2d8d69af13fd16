"""Input a run cannot use as given: cut dataset completions are warned about, images a processor or PIL refuses
and image placeholders typed as text are one line naming the row (train, eval) or a 400 (gkd serve), and a
diverged student's non-finite logits end sampling in one line instead of an index error."""

import json
import struct
import threading
import zlib

import pytest
import torch

from gkd.config import ServeConfig, TrainConfig
from gkd.errors import GKDError
from gkd.rollout.base import RowSeededSampling, SamplingConfig
from gkd.teacher.serve import TeacherServer
from helpers import assert_one_line_error, gkd_in_process, http
from tiny import write_image


def _rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bomb_png(path):
    """A PNG whose header says 30000 x 30000 pixels (PIL refuses to open it: a decompression bomb)."""
    from PIL import Image

    write_image(path, 1, size=(1, 1))
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", 30000, 30000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    return path


# --- dataset completions longer than --max_completion_length -------------------------------------------


def test_cut_dataset_completions_are_warned_about(tiny, tmp_path):
    """A dataset completion over --max_completion_length loses its EOS: training says how many rows it cut
    (it cut them silently), and the flag's help says it applies to dataset completions."""
    data = _rows(tmp_path / "d.jsonl", [{"prompt": "w1 w2", "completion": " ".join(f"w{i}" for i in range(20))},
                                        {"prompt": "w3", "completion": "w4"}])
    proc = gkd_in_process("train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset",
                          str(data), "--output_dir", str(tmp_path / "out"), "--max_completion_length", "4",
                          "--micro_batch_size", "2", "--global_batch_size", "2", "--max_steps", "1", "--lmbda", "0",
                          "--progress_bar", "false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert "cut 1 dataset completion(s) longer than --max_completion_length 4 to their first 4 tokens" in out, out
    assert f"{data}:1" in out and f"{data}:2" not in out, out
    help_text = next(f.metadata["help"] for f in TrainConfig.__dataclass_fields__.values()
                     if f.name == "max_completion_length")
    assert "dataset completions are cut" in help_text


# --- images a run cannot use ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_images(vl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-images")
    write_image(folder / "wide.png", 3, size=(4000, 2))
    _bomb_png(folder / "bomb.png")
    return folder


@pytest.mark.parametrize("image,message", [
    ("wide.png", "(4000 x 2 pixels): this model's image processor refuses it (absolute aspect ratio"),
    ("bomb.png", "too large to decode"),
])
@pytest.mark.parametrize("command", ["train", "eval"])
def test_images_the_model_cannot_take_are_one_line_naming_row_and_file(vl, bad_images, tmp_path, image, message,
                                                                       command):
    """A 4000 x 2 or a 30000 x 30000 image is one line naming the row and the file (it was a traceback)."""
    student, teacher = vl["pairs"]["qwen2_vl"]
    data = _rows(bad_images / f"{command}-{image}.jsonl",
                 [{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]},
                  {"messages": [{"role": "user", "content": "<image> w1"}, {"role": "assistant", "content": "w2"}],
                   "images": [image]}])
    out = tmp_path / "out"
    args = ["--model", str(student), "--teacher_model", str(teacher), "--dataset", str(data)]
    if command == "train":
        args += ["--output_dir", str(out), "--max_steps", "1", "--global_batch_size", "1"]
    proc = gkd_in_process(command, *args)
    assert_one_line_error(proc, f"{data}:2: image {bad_images / image}")
    assert message in proc.stderr, proc.stderr
    assert not out.exists()


def test_server_answers_images_it_cannot_take_with_400(vl, bad_images):
    """gkd serve answers an image its processor or PIL refuses with 400 (it answered 500, which clients retry)."""
    import base64

    server = TeacherServer(ServeConfig(model=str(vl["pairs"]["qwen2_vl"][1]), port=0))
    threading.Thread(target=server.httpd.serve_forever, daemon=True).start()
    try:
        for image, message in (("wide.png", "this model's image processor refuses it"),
                               ("bomb.png", "too large to decode")):
            b64 = base64.b64encode((bad_images / image).read_bytes()).decode()
            code, body = http("POST", server.address + "/v1/completions", {
                "prompt": [[1, 2, 3]], "prompt_logprobs": 2, "max_tokens": 1, "gkd_images": [[b64]]})
            assert code == 400 and "gkd_images[0]: image" in body["error"]["message"], (code, body)
            assert message in body["error"]["message"], body
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.scorer.stop()


@pytest.mark.parametrize("content,where", [("w1 <|image_pad|> w2", "the prompt holds"),
                                           ("w1", "the completion holds")])
def test_an_image_placeholder_typed_as_text_is_one_line(vl, tmp_path, content, where):
    """A literal <|image_pad|> in text, with no image for it, is refused naming the row (it trained silently)."""
    student, teacher = vl["pairs"]["qwen2_vl"]
    answer = "w2" if where == "the prompt holds" else "w2 <|image_pad|>"
    data = _rows(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": content},
                                                      {"role": "assistant", "content": answer}]}])
    out = tmp_path / "out"
    proc = gkd_in_process("train", "--model", str(student), "--teacher_model", str(teacher), "--dataset", str(data),
                          "--output_dir", str(out), "--max_steps", "1", "--global_batch_size", "1",
                          "--max_completion_length", "4")
    assert_one_line_error(proc, f"{data}:1: {where} the image placeholder token '<|image_pad|>' as text")
    assert not out.exists()


# --- a diverged student's logits ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sampling_non_finite_logits_is_one_clear_error(bad):
    """NaN or inf logits (diverged weights) end sampling with a GKDError naming them and --learning_rate, not
    an index error from the inverse CDF; the draw itself stays in range meanwhile."""
    sampler = RowSeededSampling([1, 2], SamplingConfig(max_new_tokens=4, temperature=0.9), torch.device("cpu"))
    logits = torch.zeros(2, 300)
    logits[1, 5] = bad
    with pytest.raises(GKDError, match=r"logits are not finite \(NaN or inf\).*lower --learning_rate"):
        sampler.draw(logits)
    from gkd.rollout.decode import inverse_cdf

    probs = torch.full((2, 300), float("nan"))
    assert inverse_cdf(probs, torch.tensor([0.3, 0.9], dtype=torch.float64)).max() < 300


def test_a_diverged_student_on_policy_is_one_line(tiny, tmp_path):
    """--learning_rate 1e10 with on-policy sampling: one line pointing at --learning_rate (it was 'index 192 is out
    of bounds'), as the same divergence off-policy stops at --max_bad_steps."""
    proc = gkd_in_process("train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset",
                          tiny["data"], "--output_dir", str(tmp_path / "out"), "--max_completion_length", "4",
                          "--micro_batch_size", "4", "--global_batch_size", "4", "--max_steps", "3", "--lmbda", "1",
                          "--learning_rate", "1e10", "--lr_scheduler_type", "constant", "--progress_bar", "false")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("gkd: error:")]
    assert len(lines) == 1 and "--learning_rate" in lines[0], proc.stderr[-2000:]
    assert "index" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
