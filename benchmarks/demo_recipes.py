"""Which recipe gives the demo its best student per second of training: each recipe trains the demo's pruned
student from the same start and is judged on the demo's 8 held-out prompts and on 31 more written here
(none of them a training prompt), so that a choice does not rest on 8 prompts alone.

    .venv/bin/python benchmarks/demo_recipes.py --work W \\
        --recipe greedy60 '{"teacher_completions": "greedy", "max_steps": 60}' \\
        --recipe sampled120 '{"teacher_completions": "sampled", "teacher_samples": 2, "lmbda": 0.5, "max_steps": 120,
                              "learning_rate": 5e-4, "micro_batch_size": 4, "freeze_parameters": null}'

A recipe is the demo's training config (gkd.cli.demo) with the given keys replaced: any `gkd train` option, plus
``teacher_completions`` (greedy | sampled) and ``teacher_samples``. The demo's config freezes the embedding:
``"freeze_parameters": null`` trains it too (the RESULTS rows not named "embedding frozen"). The teacher's training rows and the held-out
prompts' greedy completions are written once into W and reused by every recipe. The recipes run one after
another in this process, each printing one JSON line (training seconds, this machine's matmul GFLOP/s measured
after it, every `gkd eval` metric on both prompt sets: ``x_`` = the 31 extra prompts), appended to
W/results.jsonl; a recipe's trained student is deleted once judged. Compare seconds only between recipes run
on a quiet machine; the teacher's completions can differ by a token between processes (the decode loop picks
its linear-layer form by timing it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

# New held-out prompts of the demo's kinds (checked below against the training and held-out prompts).
EXTRA_PROMPTS = [
    "Name a fish that lives in rivers.", "What is 8 plus 5?", "Give me a synonym for 'big'.",
    "What does a compass show?", "Translate 'thank you' into French.", "What is the opposite of 'fast'?",
    "What do plants need to grow?", "What is the smallest planet in our solar system?",
    "List two fruits that are yellow.", "What is the plural of 'child'?", "Name a tool used to hammer nails.",
    "What do cows give us?", "Give an example of an adjective.", "What is 6 times 7?",
    "Which season comes after summer?", "Name a musical instrument you blow into.",
    "What color do you get by mixing red and white?", "Write a short thank-you note to a teacher.",
    "What is the main language spoken in Mexico?", "What is the chemical symbol for water?",
    "Describe a dog in one sentence.", "What is the square root of 49?", "What do you call a baby cat?",
    "Name a vegetable that is green.", "What is 50 divided by 5?", "Name a flower that is red.",
    "What is the largest ocean on Earth?", "What do you call a baby horse?", "What is 11 minus 4?",
    "Give a word that rhymes with 'cat'.", "Name a country in Africa.",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="folder for the student, the rows and the results")
    p.add_argument("--recipe", nargs=2, action="append", metavar=("NAME", "JSON"), required=True,
                   help="a name and the demo config's keys to replace")
    args = p.parse_args()

    import torch

    from gkd.cli import demo
    from gkd.evaluate import evaluate, greedy
    from gkd.machine import training_gflop_s
    from gkd.models import SMOLLM2, eos_ids, load_model, load_tokenizer
    from gkd.prompts import eval_prompts, train_prompts
    from gkd.train.trainer import Trainer

    seen = set(train_prompts()) | set(eval_prompts())
    assert not seen & set(EXTRA_PROMPTS), sorted(seen & set(EXTRA_PROMPTS))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok, teacher = load_tokenizer(SMOLLM2), load_model(SMOLLM2).eval()
    student_dir = demo._student(work, demo._layers(demo.STUDENT_LAYERS))
    cpu = torch.device("cpu")
    kw = dict(eos_ids=eos_ids(tok, teacher), pad_id=tok.pad_token_id, beta=0.0, temperature=0.9, max_new_tokens=40,
              device=cpu)

    def held_out(name: str, questions: list[str]):
        prompts = [demo.chat_prompt(tok, q) for q in questions]
        path = work / f"teacher-greedy-{name}.json"
        if not path.exists():
            path.write_text(json.dumps(greedy(teacher, prompts, kw["eos_ids"], kw["pad_id"], 40, cpu, 16,
                                                 [{} for _ in prompts])))
        return prompts, json.loads(path.read_text())

    sets = {"": held_out("heldout", eval_prompts()), "x_": held_out("extra", EXTRA_PROMPTS)}
    for name, spec in args.recipe:
        over = json.loads(spec)
        mode = over.pop("teacher_completions", "greedy")
        per_prompt = 0 if mode == "greedy" else over.pop("teacher_samples", 2)
        rows = work / f"train-{mode}{per_prompt or ''}.jsonl"
        if not rows.exists():
            demo._write_jsonl(rows, [{"prompt": q, "completion": c} for q, c in demo.teacher_written(
                teacher, tok, train_prompts(), per_prompt, 40)])
        a = argparse.Namespace(beta=0.0, lmbda=0.0, max_completion_length=40, learning_rate=1e-3, max_steps=72,
                               progress_bar=False)
        cfg = demo._train_config(a, student_dir, rows, work / "runs" / name)
        cfg = dataclasses.replace(cfg, save_steps=0, **over)
        cfg.validate()
        trainer = Trainer(cfg, log=lambda *_: None)
        started = time.perf_counter()
        try:
            trainer.train()
        finally:
            trainer.close()
        seconds = time.perf_counter() - started
        record = {"name": name, "recipe": spec, "train_seconds": round(seconds, 1),
                  "matmul_gflop_s": round(training_gflop_s(), 1)}
        for prefix, (prompts, completions) in sets.items():
            metrics = evaluate(trainer.student.eval(), teacher, prompts, teacher_completions=completions, **kw).metrics
            record.update({prefix + k: round(v, 4) for k, v in metrics.items()})
        shutil.rmtree(work / "runs" / name)  # (its checkpoint and final folders: over 1 GB a recipe)
        print(json.dumps(record), flush=True)
        with open(work / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
