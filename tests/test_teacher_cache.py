"""--teacher_cache and `gkd cache`: a cached run equals the live run -- top-K (K = 8) and full-vocabulary
(K = 0: the teacher's final hidden states) -- and its second epoch asks the teacher nothing; any change of
teacher, K or temperature scores afresh; torn and flipped entries are found and scored again; concurrent writers
leave valid entries; bad folders are one line; a remote teacher, FSDP, PP and CP work too."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gkd.teacher.cache import MARKER, TeacherCache
from gkd.teacher.local import LocalTeacher
from gkd.teacher.remote import RemoteTeacher
from helpers import (ENV, ROOT, assert_one_line_error, declare, final_weights, gkd_in_process, gkd_subprocess, losses,
                     set_arg)

K = "8"
KS = ["8", "0"]  # the top-8 entries and the full vocabulary's hidden states


def train_args(tiny, out, *extra, k: str = K) -> list[str]:
    """2 epochs of the tiny models (16 rows, 8 a step: 4 steps), all off-policy unless ``extra`` says."""
    return ["train", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
            "--output_dir", str(out), "--max_completion_length", "6", "--learning_rate", "1e-3",
            "--lr_scheduler_type", "constant", "--micro_batch_size", "2", "--global_batch_size", "8",
            "--progress_bar", "false", "--lmbda", "0", "--sft_alpha", "0.3", "--num_train_epochs", "2",
            "--gkd_logits_topk", k, *extra]


def cache_args(tiny, cache, *extra, k: str = K) -> list[str]:
    return ["cache", "--model", tiny["student"], "--teacher_model", tiny["teacher"], "--dataset", tiny["data"],
            "--max_completion_length", "6", "--micro_batch_size", "2", "--progress_bar", "false",
            "--gkd_logits_topk", k, "--teacher_cache", str(cache), *extra]


def summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lives(tiny, tmp_path_factory):
    """The references, made on first use: the same run scored live by the local teacher, per K."""
    made = {}

    def live(k: str = K) -> Path:
        if k not in made:
            out = tmp_path_factory.mktemp(f"live-k{k}")
            proc = gkd_in_process(*train_args(tiny, out, k=k))
            assert proc.returncode == 0, proc.stderr[-3000:]
            made[k] = out
        return made[k]

    return live


@pytest.fixture
def live(lives):
    return lives()


@pytest.fixture
def forwards(monkeypatch):
    """Every forward of the local teacher: whether its batch was student-sampled (on-policy), in order."""
    seen = []
    real = LocalTeacher.score

    def counted(self, batch, split=None):
        seen.append(batch.sampled)
        return real(self, batch, split)

    monkeypatch.setattr(LocalTeacher, "score", counted)
    return seen


def assert_equal_runs(ref: Path, got: Path, tol: float = 1e-7) -> None:
    a, b = losses(ref), losses(got)
    assert list(a) == list(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= tol, (step, a[step], b[step])
    w_ref, w = final_weights(ref), final_weights(got)
    assert w_ref.keys() == w.keys()
    for k in w_ref:
        torch.testing.assert_close(w[k], w_ref[k], rtol=0, atol=tol, msg=k)


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "entries").glob("*/*.json"))


def assert_valid(cache: Path, n: int) -> None:
    """``n`` entries, each with a checksum matching its body, and no temp file left behind."""
    import hashlib

    files = entries(cache)
    assert len(files) == n, files
    for f in files:
        head, _, body = f.read_bytes().partition(b"\n")
        assert hashlib.sha256(body).hexdigest().encode() == head, f
        assert json.loads(body)["key"] == f.stem
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("k", KS)
def test_cached_run_equals_live_run_and_epoch_two_asks_the_teacher_nothing(tiny, lives, tmp_path, forwards, k):
    cache = tmp_path / "cache"
    proc = gkd_in_process(*train_args(tiny, tmp_path / "a", "--teacher_cache", str(cache), k=k))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # epoch 1 (steps 1-2): 4 micro-batches a step, all scored; epoch 2 (steps 3-4): every row from the cache
    assert forwards == [False] * 8
    assert "16 rows reused, 16 scored" in proc.stderr
    assert_equal_runs(lives(k), tmp_path / "a")
    assert_valid(cache, 16)
    assert all(("hidden" in json.loads(f.read_bytes().partition(b"\n")[2])) == (k == "0") for f in entries(cache))
    # another run over the same folder: no teacher forward at all, the same result
    forwards.clear()
    proc = gkd_in_process(*train_args(tiny, tmp_path / "b", "--teacher_cache", str(cache), k=k))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert forwards == []
    assert_equal_runs(lives(k), tmp_path / "b")


@pytest.mark.parametrize("k", KS)
def test_packed_runs_and_gkd_cache_share_entries_with_padded_ones(tiny, lives, tmp_path, forwards, k):
    """--packing changes how rows sit in a forward, not what is stored per row: a packed `gkd cache` fills the
    entries a padded run reads without asking the teacher (and equals the live run), and a packed run reads them."""
    live = lives(k)  # (made first: its forwards are not counted)
    forwards.clear()
    cache = tmp_path / "cache"
    got = summary(gkd_in_process(*cache_args(tiny, cache, "--packing", "true", "--micro_batch_size", "4", k=k)))
    assert (got["rows_scored"], got["rows_already_cached"]) == (16, 0) and len(forwards) == 4  # 4 packed rows of 4
    assert_valid(cache, 16)
    forwards.clear()
    for out, extra in ((tmp_path / "padded", ()), (tmp_path / "packed", ("--packing", "true"))):
        proc = gkd_in_process(*train_args(tiny, out, "--teacher_cache", str(cache), *extra, k=k))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert forwards == [] and "32 rows reused, 0 scored" in proc.stderr
        assert_equal_runs(live, out, tol=1e-6)


def test_on_policy_rows_are_scored_live_and_never_stored(tiny, tmp_path, forwards):
    cache = tmp_path / "cache"
    proc = gkd_in_process(*train_args(tiny, tmp_path / "a", "--teacher_cache", str(cache), "--lmbda", "0.5",
                                      "--max_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert forwards == [False] * 4 + [True] * 4  # step 1 off-policy, step 2 on-policy (seed 42)
    assert_valid(cache, 8)  # step 1's rows only


def test_another_teacher_k_or_temperature_is_scored_afresh(tiny, tmp_path, forwards):
    from tiny import write_model

    cache = tmp_path / "cache"
    first = summary(gkd_in_process(*cache_args(tiny, cache)))
    assert (first["rows"], first["rows_scored"], first["rows_already_cached"]) == (16, 16, 0)
    assert first["bytes_written"] == sum(f.stat().st_size for f in entries(cache))
    assert len(forwards) == 8
    again = summary(gkd_in_process(*cache_args(tiny, cache)))
    assert (again["rows_scored"], again["rows_already_cached"], again["bytes_written"]) == (0, 16, 0)
    assert len(forwards) == 8  # nothing scored
    # the same architecture, other weights; then the very folder's weights changed on disk
    other = write_model(tmp_path / "other", layers=3, seed=7)
    changed = tmp_path / "changed"
    shutil.copytree(tiny["teacher"], changed)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(changed / "model.safetensors"))
    name = min(weights)
    weights[name] = weights[name] + 1e-3  # one tensor nudged, the rest of the folder as it was
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    for i, (flag, value) in enumerate([("--teacher_model", str(other)), ("--teacher_model", str(changed)),
                                       ("--gkd_logits_topk", "4"), ("--temperature", "0.7"),
                                       ("--loss_temperature", "1.0")]):
        args = cache_args(tiny, cache)
        args = set_arg(args, flag, value) if flag in args else args + [flag, value]
        got = summary(gkd_in_process(*args))
        assert (got["rows_scored"], got["rows_already_cached"]) == (16, 0), (flag, value, got)
        assert len(entries(cache)) == 16 * (i + 2)  # each key its own entries, side by side
    assert len(forwards) == 8 * 6


@pytest.mark.parametrize("k", KS)
def test_torn_and_flipped_entries_are_found_and_scored_again(tiny, lives, tmp_path, forwards, k):
    cache = tmp_path / "cache"
    summary(gkd_in_process(*cache_args(tiny, cache, k=k)))
    files = entries(cache)
    torn, flipped = files[3], files[11]
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # as a kill -9 mid-write would leave it
    # one character of the log-probs (hidden states) changed into another valid one: the entry still parses,
    # only the checksum tells (the first value's leading bytes, so the value really changes)
    data = bytearray(flipped.read_bytes())
    field = b'"logprobs":"' if k != "0" else b'"data":"'
    at = data.index(field) + len(field) + 2
    data[at] = ord("B") if data[at] != ord("B") else ord("C")
    flipped.write_bytes(bytes(data))
    live = lives(k)  # (made first: its forwards are not counted)
    forwards.clear()
    proc = gkd_in_process(*train_args(tiny, tmp_path / "a", "--teacher_cache", str(cache), k=k))
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [ln for ln in proc.stderr.splitlines() if "damaged entry" in ln]
    assert len(warned) == 2 and any(str(torn) in ln for ln in warned) and any(str(flipped) in ln for ln in warned)
    assert "checksum mismatch" in warned[0]
    assert 1 <= len(forwards) <= 2  # only the micro-batches holding the damaged rows, once
    assert_equal_runs(live, tmp_path / "a")
    assert_valid(cache, 16)  # both rewritten whole


def _write_and_read(folder: str, rows: list, rounds: int) -> None:
    """A process that stores ``rows`` again and again and reads each back: exit 1 on any damaged read."""
    damaged = []
    cache = TeacherCache(folder, {"kind": "local", "fingerprint": "f"}, 8, 0.9, log=damaged.append)
    for _ in range(rounds):
        for seq, r0, ids, lp in rows:
            key = cache.key(seq, r0)
            cache.put(key, ids, lp, r0)
            got = cache.get(key, len(seq) - 1 - r0, r0)
            if got is None or not (torch.equal(got[0], ids) and torch.equal(got[1], lp)):
                os._exit(1)
    os._exit(1 if damaged else 0)


def test_processes_writing_the_same_entries_at_once_never_read_half_a_file(tmp_path):
    import multiprocessing

    g = torch.Generator().manual_seed(0)
    rows = []
    for n in range(4, 20):
        seq = torch.randint(0, 96, (n,), generator=g).tolist()
        rows.append((seq, 2, torch.randint(0, 96, (n - 3, 8), generator=g), torch.randn(n - 3, 8, generator=g)))
    ctx = multiprocessing.get_context("fork")  # no re-import: the children only hash, write and read files
    procs = [ctx.Process(target=_write_and_read, args=(str(tmp_path / "cache"), rows, 20)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert_valid(tmp_path / "cache", len(rows))


@pytest.mark.slow
def test_two_gkd_cache_processes_fill_one_cache_at_once(tiny, tmp_path):
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "gkd", *cache_args(tiny, cache)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["rows_scored"] + got["rows_already_cached"] == 16 and got["damaged_entries_rescored"] == 0
    assert_valid(cache, 16)
    again = summary(gkd_in_process(*cache_args(tiny, cache)))
    assert (again["rows_scored"], again["rows_already_cached"]) == (0, 16)


def test_bad_cache_folders_and_flags_are_one_line(tiny, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine\n")
    out = tmp_path / "out"
    # the real command once, the rest in this process
    proc = gkd_subprocess(*train_args(tiny, out, "--teacher_cache", str(a_file)))
    assert_one_line_error(proc, f"--teacher_cache {a_file}: {a_file} is a file, not a folder")
    assert a_file.read_text() == "mine\n" and not out.exists()
    if os.geteuid() == 0:  # root writes anywhere a chmod forbids; sysfs refuses even root
        unwritable = Path("/sys/kernel/gkd-teacher-cache")
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        unwritable = tmp_path / "ro" / "cache"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    for args, needle in [
        (train_args(tiny, out, "--teacher_cache", str(unwritable)), f"--teacher_cache {unwritable}: not writable"),
        (cache_args(tiny, unwritable), f"--teacher_cache {unwritable}: not writable"),
        (train_args(tiny, out, "--teacher_cache", str(foreign)), "holds other files and no " + MARKER),
        (train_args(tiny, out, "--teacher_cache", str(tmp_path / "c"), "--seq_kd", "true"), "--teacher_cache with --seq_kd"),
        (cache_args(tiny, "")[:-2], "gkd cache needs --teacher_cache DIR"),
    ]:
        assert_one_line_error(gkd_in_process(*args), needle)
    assert not out.exists() and not unwritable.exists() and not (tmp_path / "c").exists()
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


def test_key_covers_rows_teacher_k_and_temperature(tmp_path):
    """The key's parts one by one (the runs above check that changes reach it from the flags)."""
    base = TeacherCache(str(tmp_path / "c"), {"kind": "local", "fingerprint": "a"}, 8, 0.9, log=lambda m: None)
    key = base.key([1, 2, 3, 4], 2)
    assert key == TeacherCache(str(tmp_path / "c"), {"kind": "local", "fingerprint": "a"}, 8, 0.9).key([1, 2, 3, 4], 2)
    others = [base.key([1, 2, 3, 5], 2), base.key([1, 2, 3, 4], 1),
              TeacherCache(str(tmp_path / "c"), {"kind": "local", "fingerprint": "b"}, 8, 0.9).key([1, 2, 3, 4], 2),
              TeacherCache(str(tmp_path / "c"), {"kind": "local", "fingerprint": "a"}, 4, 0.9).key([1, 2, 3, 4], 2),
              TeacherCache(str(tmp_path / "c"), {"kind": "local", "fingerprint": "a"}, 8, 1.0).key([1, 2, 3, 4], 2)]
    assert len({key, *others}) == 6
    # hidden states (K = 0) are the same at any loss temperature: one entry serves them all
    hidden = [TeacherCache(str(tmp_path / "c"), {"kind": "local", "fingerprint": "a"}, 0, t).key([1, 2, 3, 4], 2)
              for t in (0.9, 1.0)]
    assert hidden[0] == hidden[1] and hidden[0] not in {key, *others}


@pytest.mark.slow
def test_remote_teacher_cache_and_a_new_server_weights_fingerprint(tiny, tmp_path, monkeypatch):
    from helpers import start_gkd_serve, stop
    from tiny import write_model

    asked = []
    real = RemoteTeacher._request
    monkeypatch.setattr(RemoteTeacher, "_request", lambda self, seqs: asked.append(len(seqs)) or real(self, seqs))

    def remote(url, *extra, k=K):
        args = train_args(tiny, *extra, k=k)
        i = args.index("--teacher_model")
        return args[:i] + ["--teacher_model_server", url] + args[i + 2:]

    proc, url = start_gkd_serve(tiny["teacher"], "--served_model_name", "teacher")
    try:
        live = gkd_in_process(*remote(url, tmp_path / "live"))
        assert live.returncode == 0, live.stderr[-3000:]
        asked.clear()
        cache = tmp_path / "cache"
        run = gkd_in_process(*remote(url, tmp_path / "a", "--teacher_cache", str(cache)))
        assert run.returncode == 0, run.stderr[-3000:]
        probes = 1  # connect asks once to check K
        assert len(asked) == probes + 8  # epoch 1 only: 8 micro-batches of 2 rows
        assert_equal_runs(tmp_path / "live", tmp_path / "a")
        assert_valid(cache, 16)
        # gkd cache against the same server: every row is there already
        args = remote(url, tmp_path / "unused", "--teacher_cache", str(cache))
        args = ["cache"] + [a for a in args[1:] if a not in ("--output_dir", str(tmp_path / "unused"))]
        asked.clear()
        got = summary(gkd_in_process(*args))
        assert (got["rows_scored"], got["rows_already_cached"], asked) == (0, 16, [1])  # the K probe alone
        # the full vocabulary on the hidden wire: the server's hidden states are stored; a second run asks nothing
        hidden = ("--teacher_wire", "hidden")
        ref = gkd_in_process(*remote(url, tmp_path / "live-hidden", *hidden, k="0"))
        assert ref.returncode == 0, ref.stderr[-3000:]
        for out, scored in (("h1", 16), ("h2", 0)):
            asked.clear()
            run = gkd_in_process(*remote(url, tmp_path / out, *hidden, "--teacher_cache", str(cache), k="0"))
            assert run.returncode == 0, run.stderr[-3000:]
            assert f"{32 - scored} rows reused, {scored} scored" in run.stderr and len(asked) == scored // 2, asked
            assert_equal_runs(tmp_path / "live-hidden", tmp_path / out)
        assert_valid(cache, 32)  # the top-8 entries and the hidden states side by side
    finally:
        stop(proc)
    # the same served name over other weights: its fingerprint differs, every row is scored again
    other = write_model(tmp_path / "other", layers=3, seed=7)
    proc, url = start_gkd_serve(str(other), "--served_model_name", "teacher")
    try:
        asked.clear()
        args = remote(url, tmp_path / "b", "--teacher_cache", str(cache), "--max_steps", "2")
        run = gkd_in_process(*args)
        assert run.returncode == 0, run.stderr[-3000:]
        assert len(asked) == probes + 8 and "0 rows reused, 16 scored" in run.stderr
    finally:
        stop(proc)


@pytest.mark.slow
def test_fsdp_two_processes_fill_and_reuse_the_cache(tiny, live, tmp_path):
    from helpers import torchrun_cmd

    cache = tmp_path / "cache"
    for out, said in (("a", "8 rows reused, 8 scored"), ("b", "16 rows reused, 0 scored")):
        cmd = torchrun_cmd(2, train_args(tiny, tmp_path / out, "--teacher_cache", str(cache)))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=ROOT)
        assert proc.returncode == 0, [line for line in proc.stderr.splitlines() if "gkd:" in line] or proc.stderr[-3000:]
        assert said in proc.stderr  # rank 0's share: 8 rows an epoch
        assert_valid(cache, 16)
        assert_equal_runs(live, tmp_path / out, tol=1e-5)  # two ranks sum in another order


# PP 2 and CP 2 over one cache folder each, top-K and full-vocabulary (hidden states; also FSDP 2): a first run
# fills it, a second (a later launch) reuses it
LAYOUTS = {"pp2": ["--pipeline_model_parallel_size", "2"], "cp2": ["--context_parallel_size", "2"],
           "pp2-k0": ["--pipeline_model_parallel_size", "2"], "cp2-k0": ["--context_parallel_size", "2"],
           "fsdp2-k0": []}
for _layout, _flags in LAYOUTS.items():
    for _run, _after in (("a", ()), ("b", (f"cache-{_layout}-a",))):
        declare(f"cache-{_layout}-{_run}", 2, lambda c, out, layout=_layout, flags=_flags: train_args(
            c.models("tiny"), out, "--teacher_cache", str(c.root / f"cache-{layout}"), *flags,
            k="0" if layout.endswith("-k0") else K), after=_after)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_pipeline_or_a_context_split_fills_and_reuses_the_cache(runs, lives, layout):
    """PP 2: every stage takes part in the teacher's pipelined forward of a micro-batch with a missing row; the
    last stage stores it (and, from hidden states, applies the teacher's head). CP 2: each rank scores its
    positions of the rows, the group gathers them whole and its first rank stores them. Epoch 2 and a second run
    ask the teacher nothing and train as the live run does."""
    whole = layout.startswith("fsdp")  # each rank scores its own 8 rows an epoch
    for run, said in (("a", "8 rows reused, 8 scored" if whole else "16 rows reused, 16 scored"),
                      ("b", "16 rows reused, 0 scored" if whole else "32 rows reused, 0 scored")):
        out = runs[f"cache-{layout}-{run}"]
        assert said in runs.output(f"cache-{layout}-{run}")
        assert_equal_runs(lives("0" if layout.endswith("-k0") else K), out, tol=1e-5)
    assert_valid(runs.ctx.root / f"cache-{layout}", 16)


def test_the_processes_of_one_run_never_see_its_cache_half_made(tmp_path, monkeypatch):
    """Every process of a run checks the folder while the others probe it or make the cache: another
    process's probe or marker temp file is not "other files", and the marker exists before anything else
    (a process checking between two of the maker's steps failed a 2-process run under load)."""
    from gkd.teacher.cache import check_folder

    folder = tmp_path / "cache"
    (folder / ".gkd-probe-abc").mkdir(parents=True)  # another process's writability probe
    (folder / f".{MARKER}.x1.tmp").write_text("")  # another process's marker, being written
    assert check_folder(str(folder)) == folder.absolute()
    seen = []
    mkdir = Path.mkdir

    def checking(self, *a, **kw):  # each step of making the cache, as another process would see it
        mkdir(self, *a, **kw)
        if self.is_relative_to(folder):
            seen.append((self.name, check_folder(str(folder)) == folder.absolute()))

    monkeypatch.setattr(Path, "mkdir", checking)
    TeacherCache(str(folder), {"model": "t"}, 4, 1.0, log=lambda *_: None)
    assert seen and all(ok for _, ok in seen), seen
    assert (folder / MARKER).is_file()
