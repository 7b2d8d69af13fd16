"""Whose student ends better: the GKD paper's main comparison on the embedded task, gkd against TRL.

    .venv/bin/python benchmarks/quality.py                       # the full run
    .venv/bin/python benchmarks/quality.py --steps 4 --seeds 0 --lrs 3e-4 --lmbdas 0 1 --betas 0   # a smoke run

The task is the demo's (`gkd demo`): teacher SmolLM2-135M-Instruct, student its layers 0-5 and 21-29,
the 152 built-in training prompts with completions the teacher wrote (--teacher_samples per prompt,
seeded, temperature 0.9), the 8 held-out prompts for evaluation (--eval_prompts wide: and demo_recipes.py's 31
more held-out prompts). Both tools train the same student on the same rows for the same steps and batch (one
micro-batch per step), with AdamW, a cosine schedule with 10 % warm-up, sampling at --temperature,
--max_new_tokens new tokens per on-policy sample. The divergence is computed at temperature 1 on both sides:
TRL's GKDTrainer uses its temperature for sampling only, so gkd runs with `--loss_temperature 1`
(--loss_temperature here; other values run gkd alone). Both run on-policy on the same steps: gkd's per-step
lmbda draw for the run's seed, given to TRL in place of its own coin flip (with 16 steps at lmbda 0.5 the count
alone varies from 6 to 9 between seeds, and on-policy steps change the student more than the tools differ).

1. Learning-rate sweep: each tool at each of --lrs, at lmbda 0.5 / beta 0, every seed; the tool's best
   rate is the one with the highest mean held-out top-1 agreement (chosen on the held-out prompts: this
   is a comparison of tools, not a model selection for later use).
2. The grid at each tool's best rate: lmbda in --lmbdas (0 = supervised KD on the teacher's
   completions, 1 = on-policy) x beta in --betas (0 forward KL, 0.5 JSD, 1 reverse KL), every seed.

With --budget_s S the runs are bounded by wall-clock instead of steps (equal compute): each tool trains for S
seconds under the same time-based schedule (`gkd train --max_train_seconds`; TRL's runner applies the same
schedule and stops at the first step past S), on-policy on the same step indices, and the tables add the steps
each reached and the tokens it trained. TRL then runs one process per run, trained and judged in turn, so its
training never shares the cores with judging (gkd's process judges after training, likewise).

Recipes beyond the objective: --teacher_samples 0 trains both tools on the teacher's greedy completion of each
prompt (sequence-level KD, the demo's data); --freeze_embedding keeps both students' embedding (tied to the output
layer) as loaded (gkd's --freeze_parameters model.embed_tokens; the same requires_grad_(False) in TRL's runner);
--gkd_teacher_cache gives gkd's runs a teacher cache of their own, fresh for each run (`--teacher_cache`, the full
vocabulary's hidden states: epochs after the first skip the teacher's layers), which TRL has no counterpart of.
--sweep_lmbda sets the lmbda of the learning-rate sweep (a sweep cell that is also a grid cell runs once).

With --warm_start sft the student is first fine-tuned on the teacher-written rows (cross-entropy on the
completions, --warm_start_steps steps of --batch_size rows at --warm_start_lr, cosine), as the GKD paper's
students are, and every run of both tools starts from it.

Every student, gkd's and TRL's, is evaluated by the same code (gkd.evaluate): forward KL at
--temperature and top-1 agreement on the teacher's greedy completions, the student's perplexity on them, and the
teacher's mean log-prob of the student's own samples (--eval_samples seeded samples per prompt at
--temperature). Tables give mean ± half the range over seeds; a plot goes next to the results in --work.
The two tools run side by side (--jobs 2: each in its own process with one of the two threads); TRL runs
in its own venv (benchmarks/e2e_vs_trl.py makes it), all its trainings in one process. Finished runs are
kept in --work/results-<tool>.json with the settings they ran under and not run again (a --work holding
results of other settings is refused: use another --work, or delete it to start over).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

METRICS = ("divergence", "top1_agreement", "student_ppl_on_teacher", "teacher_logprob_of_samples")
COLUMNS = (*METRICS, "on_policy_steps")
BUDGET_COLUMNS = (*COLUMNS, "steps", "trained_tokens", "train_seconds")
SCHEDULE_BOUND = 20_000  # steps whose lmbda draw a timed run may need (far beyond any budget here)


def prepare(work: Path, samples: int, max_new_tokens: int) -> tuple[Path, Path, Path]:
    """The teacher as a plain HF folder, the demo's student and the teacher-written training rows."""
    from gkd.cli.demo import STUDENT_LAYERS, _layers, teacher_written
    from gkd.models import SMOLLM2, load_model, load_tokenizer, prune_command
    from gkd.prompts import train_prompts

    teacher_dir, student_dir, data = work / "teacher", work / "student", work / "train.jsonl"
    if not (teacher_dir / "config.json").is_file():
        prune_command(SMOLLM2, str(teacher_dir), list(range(30)), 1, "float32")  # all layers: a plain copy
    if not (student_dir / "config.json").is_file():
        prune_command(str(teacher_dir), str(student_dir), _layers(STUDENT_LAYERS), 1, "float32")
    if not data.is_file():
        written = f"{samples} completions" if samples else "its greedy completion"
        print(f"[quality] the teacher writes {written} per training prompt", flush=True)
        tok, teacher = load_tokenizer(str(teacher_dir)), load_model(str(teacher_dir)).eval()
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": c}]}
                for q, c in teacher_written(teacher, tok, train_prompts(), samples, max_new_tokens)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return teacher_dir, student_dir, data


def warm_start(work: Path, student_dir: Path, data: Path, a) -> Path:
    """The student fine-tuned on the teacher-written rows (cross-entropy on the completion tokens): the GKD
    paper's supervised start. Made once per --work."""
    import torch

    from gkd.data.rows import load_examples
    from gkd.models import load_model, load_tokenizer
    from gkd.train.budget import factor

    out = work / "student-sft"
    if (out / "config.json").is_file():
        return out
    print(f"[quality] warm start: {a.warm_start_steps} supervised steps on the teacher-written rows", flush=True)
    torch.manual_seed(0)
    tok, model = load_tokenizer(str(student_dir)), load_model(str(student_dir)).train()
    rows = load_examples([str(data)], tok, max_length=1024, truncation_strategy="left",
                         max_completion_length=a.max_new_tokens, warn=lambda *_: None)
    opt = torch.optim.AdamW(model.parameters(), lr=a.warm_start_lr)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    for step in range(a.warm_start_steps):
        for g in opt.param_groups:
            g["lr"] = a.warm_start_lr * factor("cosine", 0.1, step / a.warm_start_steps)
        batch = [rows[order[(step * a.batch_size + i) % len(rows)]] for i in range(a.batch_size)]
        seqs = [r.prompt_ids + r.completion_ids for r in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        labels = torch.tensor([[-100] * len(r.prompt_ids) + r.completion_ids + [-100] * (width - len(s))
                               for r, s in zip(batch, seqs)])
        mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    tmp = work / "student-sft.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


class Judge:
    """The held-out evaluation every student goes through (the teacher's greedy completions made once)."""

    def __init__(self, teacher_dir: Path, a):
        import torch

        from demo_recipes import EXTRA_PROMPTS
        from gkd.cli.demo import chat_prompt
        from gkd.models import eos_ids, load_model, load_tokenizer
        from gkd.prompts import eval_prompts

        self.tok = load_tokenizer(str(teacher_dir))
        self.teacher = load_model(str(teacher_dir)).eval()
        questions = eval_prompts() + (EXTRA_PROMPTS if a.eval_prompts == "wide" else [])
        self.prompts = [chat_prompt(self.tok, q) for q in questions]
        self.kw = dict(eos_ids=eos_ids(self.tok, self.teacher), pad_id=self.tok.pad_token_id, beta=0.0,
                       temperature=a.temperature, max_new_tokens=a.max_new_tokens, device=torch.device("cpu"),
                       samples=a.eval_samples)
        self.teacher_completions = None

    def __call__(self, student) -> dict:
        from gkd.evaluate import evaluate

        result = evaluate(student.eval(), self.teacher, self.prompts, teacher_completions=self.teacher_completions,
                          **self.kw)
        self.teacher_completions = result.teacher_completions
        return {k: result.metrics[k] for k in METRICS}


def on_policy_steps(run: dict, steps: int) -> list[int]:
    """The 0-based steps gkd runs on-policy for this run's seed and lmbda (its per-step draw); TRL is given
    the same schedule in place of its own coin flip, so both tools sample on the same steps."""
    from gkd.data.order import lmbda_draw

    return [s for s in range(steps) if lmbda_draw(run["seed"], s) < run["lmbda"]]


def fresh_cache(folder: Path) -> Path:
    """An empty folder for one run's teacher cache (each run scores its first epoch itself)."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def run_gkd(run: dict, a, teacher_dir: Path, student_dir: Path, data: Path, judge: Judge) -> dict:
    from gkd.config import TrainConfig
    from gkd.train.metrics import read_metrics
    from gkd.train.trainer import Trainer

    skew = a.divergence != "gjsd"  # (its alpha is the run's beta; --beta stays the generalized JSD's default)
    cfg = TrainConfig(model=str(student_dir), teacher_model=str(teacher_dir), dataset=[str(data)],
                      **({} if skew else {"beta": run["beta"]}), lmbda=run["lmbda"], temperature=a.temperature, loss_temperature=a.loss_temperature,
                      max_completion_length=a.max_new_tokens,
                      micro_batch_size=a.batch_size, global_batch_size=a.batch_size,
                      learning_rate=run["learning_rate"], lr_scheduler_type="cosine", warmup_ratio=0.1,
                      max_steps=0 if a.budget_s else a.steps, max_train_seconds=a.budget_s, seed=run["seed"],
                      freeze_parameters=["model.embed_tokens"] if a.freeze_embedding else None,
                      teacher_cache=str(fresh_cache(a.work / "gkd-cache")) if a.gkd_teacher_cache else "",
                      output_dir=str(a.work / "gkd-run"), save_steps=0,
                      logging_steps=1, progress_bar=False, overwrite_output_dir=True,
                      speculative_kd_topk=a.speculative_kd_topk if run["lmbda"] > 0 else 0,
                      **({"divergence": a.divergence, "skew_alpha": run["beta"] or 0.1} if skew else {}),
                      **({"lmbda_schedule": "adaptive", "eval_steps": a.eval_steps, "split_dataset_ratio": 0.05}
                         if a.lmbda_schedule == "adaptive" else {}))
    started = time.perf_counter()
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.train()
    seconds = time.perf_counter() - started
    metrics = judge(trainer.student)
    trainer.close()
    del trainer
    gc.collect()
    logged = [m for m in read_metrics(a.work / "gkd-run" / "metrics.jsonl") if "loss" in m]  # not evaluations
    sampled = [m["step"] - 1 for m in logged if m["on_policy_share"]]
    if a.lmbda_schedule == "fixed":  # the steps TRL is given
        assert sampled == on_policy_steps(run, len(logged)), (run, sampled)
    if a.budget_s:
        seconds = logged[-1]["train_seconds"]  # the trainer's own clock: the steps, not the loading
    return {**metrics, "train_seconds": round(seconds, 1), "on_policy_steps": len(sampled), "steps": len(logged),
            "trained_tokens": round(sum(m["tokens_per_s"] * m["step_time"] for m in logged))}


def run_trl(runs: list[dict], a, teacher_dir: Path, student_dir: Path, data: Path, judge: Judge) -> list[dict]:
    """``runs`` in TRL's runner (each from a fresh student): with a step bound all in one process, each saved
    student judged here while it trains the next; with a time budget one process per run, judged after it
    ends, so that judging never takes cores from a timed run."""
    if a.budget_s:
        return [r for run in runs for r in _run_trl([run], a, teacher_dir, student_dir, data, judge)]
    return _run_trl(runs, a, teacher_dir, student_dir, data, judge)


def _run_trl(runs: list[dict], a, teacher_dir: Path, student_dir: Path, data: Path, judge: Judge) -> list[dict]:
    from e2e_vs_trl import trl_python
    from gkd.models import load_model

    py = trl_python(a.trl_venv.absolute())
    bound = SCHEDULE_BOUND if a.budget_s else a.steps
    plan = [{"lmbda": r["lmbda"], "beta": r["beta"], "seed": r["seed"], "learning_rate": r["learning_rate"],
             "on_policy_steps": on_policy_steps(r, bound), "save": str(a.work / "trl" / name(r))} for r in runs]
    for p in plan:  # a folder left by an interrupted run is not this run's student
        shutil.rmtree(p["save"], ignore_errors=True)
    (a.work / "trl").mkdir(parents=True, exist_ok=True)
    (a.work / "trl-plan.json").write_text(json.dumps(plan))
    started = time.perf_counter()
    proc = subprocess.Popen([str(py), str(HERE / "trl_gkd_runner.py"), "--model", str(student_dir), "--teacher",
                             str(teacher_dir), "--dataset", str(data), "--plan", str(a.work / "trl-plan.json"),
                             "--temperature", str(a.temperature), "--max_new_tokens", str(a.max_new_tokens),
                             "--batch_size", str(a.batch_size), "--steps", str(a.steps), "--threads", str(a.threads),
                             "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.1", "--budget_s", str(a.budget_s),
                             *(["--freeze_embedding"] if a.freeze_embedding else [])])
    done = []
    try:
        for p in plan:
            written = Path(p["save"]) / "trl_run.json"  # the runner's last write for an entry (renamed into place)
            while not written.is_file():
                if proc.poll() is not None:
                    raise SystemExit(f"[quality] TRL's runner ended (exit {proc.returncode}) before {p['save']}")
                time.sleep(2)
            ran = json.loads(written.read_text())
            assert ran["on_policy_steps"] == [s for s in p["on_policy_steps"] if s < ran["steps"]], (p, ran)
            if a.budget_s:  # the run is over: judge on the cores it used
                proc.wait()
            done.append({**judge(load_model(p["save"])), "on_policy_steps": len(ran["on_policy_steps"]),
                         "steps": ran["steps"], "trained_tokens": ran["trained_tokens"],
                         "train_seconds": round(ran["train_seconds"], 1)})
        if proc.wait():
            raise SystemExit(f"[quality] TRL's runner failed (exit {proc.returncode})")
    finally:
        if proc.poll() is None:  # judging failed: the runner must not go on training for nobody
            proc.kill()
    if not a.budget_s:  # one process for all: its wall time shared out
        seconds = (time.perf_counter() - started) / max(len(runs), 1)
        done = [{**d, "train_seconds": round(seconds, 1)} for d in done]
    return done


def name(run: dict) -> str:
    return f"{run['tool']}-l{run['lmbda']}-b{run['beta']}-lr{run['learning_rate']:g}-s{run['seed']}"


def execute(runs: list[dict], a, models: tuple, judge: Judge, results: dict) -> None:
    """Run what the results files do not hold yet; save after each."""
    todo = [r for r in runs if name(r) not in results]
    for r in [r for r in todo if r["tool"] == "gkd"]:
        print(f"[quality] {name(r)}", flush=True)
        results[name(r)] = {**r, **run_gkd(r, a, *models, judge)}
        save(a, results)
    trl = [r for r in todo if r["tool"] == "trl"]
    if trl:
        for r, m in zip(trl, run_trl(trl, a, *models, judge)):
            results[name(r)] = {**r, **m}
        save(a, results)


def results_file(a, tool: str) -> Path:
    return a.work / f"results-{tool}.json"


def settings(a) -> dict:
    """What every run's result depends on beside its name (tool, lmbda, beta, rate, seed)."""
    keys = ("steps", "batch_size", "max_new_tokens", "temperature", "loss_temperature", "teacher_samples",
            "eval_samples", "speculative_kd_topk", "divergence", "lmbda_schedule", "eval_steps", "budget_s", "warm_start", "warm_start_steps",
            "warm_start_lr")
    extra = ("freeze_embedding", "gkd_teacher_cache", "sweep_lmbda", "eval_prompts")  # recorded when not their defaults
    defaults = {"sweep_lmbda": 0.5, "eval_prompts": "demo"}
    return {k: getattr(a, k) for k in keys} | {k: getattr(a, k) for k in extra
                                                if getattr(a, k) != defaults.get(k, False)}


def load(a) -> dict:
    results = {}
    for tool in a.tools:
        if results_file(a, tool).is_file():
            kept = json.loads(results_file(a, tool).read_text())
            if kept.get("settings") != settings(a):
                raise SystemExit(f"[quality] {results_file(a, tool)} holds runs made with {kept.get('settings')}, not "
                                 f"{settings(a)}: use another --work, or delete it")
            results.update(kept["runs"])
    return results


def save(a, results: dict) -> None:
    """Each tool's runs in its own file: the tools may run side by side in two processes."""
    for tool in a.tools:
        mine = {k: r for k, r in results.items() if r["tool"] == tool}
        results_file(a, tool).write_text(json.dumps({"settings": settings(a), "runs": mine}, indent=1))


def side_by_side(a) -> None:
    """Each tool's sweep and grid in its own process, the threads split between them, at once."""
    threads = max(1, a.threads // len(a.tools))
    children = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--tools", tool, "--threads", str(threads),
                                  "--jobs", "1"]) for tool in a.tools]
    codes = [c.wait() for c in children]
    if any(codes):
        sys.exit(f"[quality] a tool's process failed: exit codes {dict(zip(a.tools, codes))}")


def summary(rows: list[dict], metric: str) -> str:
    values = [r[metric] for r in rows]
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2
    if metric == "trained_tokens":
        return f"{mean:.0f} ± {spread:.0f}"
    if metric in ("student_ppl_on_teacher", "on_policy_steps", "steps", "train_seconds"):
        return f"{mean:.1f} ± {spread:.1f}"
    return f"{mean:.3f} ± {spread:.3f}"


def table(groups: dict, keys: tuple[str, ...], columns: tuple[str, ...] = COLUMNS) -> str:
    head = "| " + " | ".join(keys) + " | seeds | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1 + len(columns))]
    for key, rows in groups.items():
        lines.append("| " + " | ".join(str(k) for k in key) + f" | {len(rows)} | "
                     + " | ".join(summary(rows, m) for m in columns) + " |")
    return "\n".join(lines)


def best_against_best(grid: dict, columns: tuple[str, ...]) -> str:
    """Each tool's best recipe (highest mean held-out top-1 in the grid) and the differences gkd - TRL per
    metric, beside the seeds' spread (the larger half-range of the two), each seed's pair too."""
    best = {t: max((k for k in grid if k[0] == t), key=lambda k: statistics.fmean(r["top1_agreement"] for r in grid[k]))
            for t in sorted({k[0] for k in grid})}
    lines = ["\n## Each tool's best recipe (highest mean top-1)\n", table({k: grid[k] for k in best.values()},
                                                                           ("tool", "lmbda", "beta"), columns)]
    if {"gkd", "trl"} <= best.keys():
        g, t = grid[best["gkd"]], grid[best["trl"]]
        lines.append("\n| metric | gkd - TRL (means) | seeds' spread | per seed (gkd - TRL) |\n|---|---|---|---|")
        for m in METRICS:
            spread = max((max(r[m] for r in rows) - min(r[m] for r in rows)) / 2 for rows in (g, t))
            per_seed = {r["seed"]: r[m] for r in g}
            pairs = [per_seed[r["seed"]] - r[m] for r in t if r["seed"] in per_seed]
            lines.append(f"| {m} | {statistics.fmean(r[m] for r in g) - statistics.fmean(r[m] for r in t):+.3f} | "
                         f"± {spread:.3f} | {', '.join(f'{d:+.3f}' for d in pairs)} |")
    return "\n".join(lines)


def group(rows: list[dict], keys: tuple[str, ...]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def plot(grid: dict, path: Path) -> None:
    """Each judged metric per recipe and tool: each seed a dot, the mean over seeds a line (the spread the
    comparison rests on stays visible)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4))
    labels = sorted({(k[1], k[2]) for k in grid})
    for ax, metric in zip(axes, METRICS):
        for i, tool in enumerate(sorted({k[0] for k in grid})):
            xs = [x + 0.4 * i for x in range(len(labels))]
            runs = [[r[metric] for r in grid.get((tool, *lb), [])] for lb in labels]
            for x, v in zip(xs, runs):
                if v:
                    ax.hlines(statistics.fmean(v), x - 0.15, x + 0.15, colors=f"C{i}")
                    ax.plot([x] * len(v), v, ".", color=f"C{i}", markersize=6)
            ax.plot([], [], "-", color=f"C{i}", label=tool)  # one legend entry per tool, whichever recipes it ran
        ax.set_xticks([x + 0.2 for x in range(len(labels))], [f"λ{lm}\nβ{b}" for lm, b in labels])
        ax.set_title(metric, fontsize=10)
        low = min(r[metric] for rows in grid.values() for r in rows)
        high = max(r[metric] for rows in grid.values() for r in rows)
        ax.set_ylim(low - 0.3 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))  # the differences, not zero
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-quality"))
    ap.add_argument("--trl_venv", type=Path, default=HERE / ".venv-trl", help="TRL's own venv")
    ap.add_argument("--tools", nargs="+", default=["gkd", "trl"], choices=["gkd", "trl"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (training and judging)")
    ap.add_argument("--loss_temperature", type=float, default=1.0, help="gkd's divergence temperature (TRL's is 1)")
    ap.add_argument("--teacher_samples", type=int, default=4, help="0: the teacher's greedy completion per prompt")
    ap.add_argument("--freeze_embedding", action="store_true", help="both students keep their embedding as loaded")
    ap.add_argument("--gkd_teacher_cache", action="store_true", help="gkd's runs keep the teacher's hidden states")
    ap.add_argument("--sweep_lmbda", type=float, default=0.5, help="the learning-rate sweep's lmbda")
    ap.add_argument("--eval_samples", type=int, default=8)
    ap.add_argument("--eval_prompts", default="demo", choices=("demo", "wide"),
                    help="demo: the demo's 8 held-out prompts; wide: those and demo_recipes.py's 31 more")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--lmbdas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--speculative_kd_topk", type=int, default=0,
                    help="gkd's on-policy samples teacher-corrected at this K (0 = plain; gkd train's flag)")
    ap.add_argument("--divergence", default="gjsd", choices=("gjsd", "skew_kl", "skew_reverse_kl"),
                    help="gkd's divergence; with a skew one, --betas are its --skew_alpha values (0 reads as 0.1)")
    ap.add_argument("--budget_s", type=float, default=0.0,
                    help="train each run for this many seconds instead of --steps (equal wall-clock)")
    ap.add_argument("--warm_start", default="none", choices=("none", "sft"),
                    help="sft: every run starts from the student fine-tuned on the teacher-written rows")
    ap.add_argument("--warm_start_steps", type=int, default=64)
    ap.add_argument("--warm_start_lr", type=float, default=1e-3)
    ap.add_argument("--lmbda_schedule", default="fixed", choices=("fixed", "adaptive"),
                    help="gkd's --lmbda_schedule (adaptive: DistiLLM's, from --lmbdas as the starting share, "
                         "evaluated every --eval_steps on 5 %% of the training rows held out)")
    ap.add_argument("--eval_steps", type=int, default=8, help="--lmbda_schedule adaptive: steps between evaluations")
    ap.add_argument("--threads", type=int, default=2, help="threads in all")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="2: the tools train side by side, each in "
                    "its own process with its share of the threads (on 2 cores two 1-thread processes get more done "
                    "than one 2-thread one; the metrics do not depend on it); 1: one after the other")
    a = ap.parse_args()
    if a.divergence != "gjsd" and not all(0 <= b < 1 for b in a.betas):
        raise SystemExit(f"[quality] --divergence {a.divergence}: --betas are its alphas, each in [0, 1) (0 reads as "
                         f"0.1), got {a.betas}")
    if "trl" in a.tools and (a.divergence != "gjsd" or a.lmbda_schedule != "fixed" or a.speculative_kd_topk):
        ap.error("--divergence, --lmbda_schedule and --speculative_kd_topk are gkd's options: they need --tools gkd")
    if "trl" in a.tools and a.loss_temperature != 1.0:
        ap.error("TRL computes its divergence at temperature 1: --loss_temperature other than 1 needs --tools gkd")
    import torch

    torch.set_num_threads(a.threads)
    started = time.perf_counter()
    a.work.mkdir(parents=True, exist_ok=True)
    load(a)  # a --work holding runs of other settings is refused before any work
    models = prepare(a.work, a.teacher_samples, a.max_new_tokens)
    if a.warm_start == "sft":
        models = (models[0], warm_start(a.work, models[1], models[2], a), models[2])
    if a.jobs > 1 and len(a.tools) > 1:
        side_by_side(a)  # then the runs are all in the results files, and this process prints the tables
    judge = Judge(models[0], a)
    results = load(a)

    sweep = [dict(tool=t, lmbda=a.sweep_lmbda, beta=0.0, learning_rate=lr, seed=s) for t in a.tools for lr in a.lrs
             for s in a.seeds]
    execute(sweep, a, models, judge, results)
    by_lr = group([results[name(r)] for r in sweep], ("tool", "learning_rate"))
    best = {t: max((lr for (tool, lr) in by_lr if tool == t),
                   key=lambda lr: statistics.fmean(r["top1_agreement"] for r in by_lr[(t, lr)])) for t in a.tools}
    grid_runs = [dict(tool=t, lmbda=lm, beta=b, learning_rate=best[t], seed=s) for t in a.tools for lm in a.lmbdas
                 for b in a.betas for s in a.seeds]
    execute(grid_runs, a, models, judge, results)
    grid = group([results[name(r)] for r in grid_runs], ("tool", "lmbda", "beta"))

    columns = BUDGET_COLUMNS if a.budget_s else COLUMNS
    length = f"{a.budget_s:g} s" if a.budget_s else f"{a.steps} steps"
    start = ", from the SFT warm start" if a.warm_start == "sft" else ""
    print(f"\n## Learning-rate sweep (lmbda {a.sweep_lmbda:g}, beta 0; {length} of {a.batch_size} rows{start}, seeds {a.seeds})\n")
    print(table(by_lr, ("tool", "learning rate"), columns))
    print(f"\nbest: {best}\n\n## Grid at each tool's best learning rate\n")
    print(table(grid, ("tool", "lmbda", "beta"), columns))
    overall = group([results[name(r)] for r in grid_runs], ("tool",))
    print("\n## Over the whole grid\n")
    print(table(overall, ("tool",), columns))
    if len(a.tools) > 1:
        print(best_against_best(grid, columns))
    plot(grid, a.work / "quality.png")
    print(f"\n[quality] {time.perf_counter() - started:.0f} s; {a.work}/results-*.json, {a.work / 'quality.png'}")


if __name__ == "__main__":
    main()
