"""How fast the student learns the shapes world from scratch on this machine.

    python benchmarks/student_learning.py [--minutes 1 2 5 10] [--threads 2]
        [--student '{"prediction_type": "v_prediction"}'] [--train '{"lr": 2e-3}']
        [--pool 12000] [--seeds 2] [--save DIR] [--at-steps 200 400 1000 2000]
        [--guidance 1 2 4] [--load DIR]

Single process, no Ray. Trains on a pool of reference renders (all six
categories equally, random prompts from the grammar), with the same loss,
optimiser, warm-up, grad clipping and EMA as the Ray loop. At each mark (in
minutes of training time, evaluation excluded) it samples the held-out prompts
(`heldout_prompts()`, `--seeds` seeds each) with the EMA weights and prints
the scorer's accuracy overall and per category, and how many images failed
each of the scorer's checks (objects, shapes, colors, position): what limits
the student. `--guidance` evaluates each mark at several guidance scales;
`--load DIR` only evaluates a saved checkpoint (e.g. at other `--sample`
steps). Results: benchmarks/results/student_recipe.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time

import numpy as np
import torch

from evolve.config import SampleConfig, StudentConfig, TrainConfig
from evolve.shapes.grammar import CATEGORIES, heldout_prompts, sample_prompt, vocabulary
from evolve.shapes.render import render
from evolve.shapes.scorer import score
from evolve.student.diffusion import EMA, drop_prompts, make_noise_scheduler, sample, training_loss
from evolve.student.model import Student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, nargs="+", default=[1, 2, 5, 10])
    ap.add_argument("--at-steps", type=int, nargs="+", default=None,
                    help="evaluate at these step counts instead of minutes (for a busy machine)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--student", default="{}", help="StudentConfig overrides (JSON)")
    ap.add_argument("--train", default="{}", help="TrainConfig overrides (JSON)")
    ap.add_argument("--sample", default="{}", help="SampleConfig overrides (JSON)")
    ap.add_argument("--pool", type=int, default=12000, help="reference renders to train on")
    ap.add_argument("--seeds", type=int, default=2, help="samples per held-out prompt")
    ap.add_argument("--save", default=None, help="save the final checkpoint here")
    ap.add_argument("--guidance", type=float, nargs="+", default=None,
                    help="evaluate at each of these guidance scales (default: --sample's)")
    ap.add_argument("--load", default=None, help="no training: evaluate this checkpoint (EMA weights)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scfg = StudentConfig(**{"vocabulary": tuple(vocabulary()), **json.loads(args.student)})
    tcfg = TrainConfig(**json.loads(args.train))
    smp = SampleConfig(**{"batch_size": 128, **json.loads(args.sample)})

    torch.manual_seed(tcfg.seed)
    rng = random.Random(tcfg.seed)
    nrng = np.random.default_rng(tcfg.seed)
    student = Student.from_config(scfg)
    ema = EMA(student, tcfg.ema_max_decay)
    ns = make_noise_scheduler(scfg)
    opt = torch.optim.AdamW(student.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    prompts = [sample_prompt(nrng, CATEGORIES[i % len(CATEGORIES)]).text for i in range(args.pool)]
    images = torch.from_numpy(np.stack([render(p, 10_000 + i, scfg.image_size) for i, p in enumerate(prompts)]))
    images = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    held = [p.text for p in heldout_prompts()] * args.seeds
    seeds = list(range(len(held)))
    print(f"params {student.num_parameters() / 1e6:.2f}M  student {json.loads(args.student)}  "
          f"train {json.loads(args.train)}  threads {args.threads}", flush=True)
    print(f"{'min':>5s} {'step':>6s} {'s/step':>7s} {'loss':>7s} {'acc':>6s}  " +
          " ".join(f"{c[:10]:>10s}" for c in CATEGORIES), flush=True)

    if args.load:
        evaluate(Student.from_pretrained(args.load), held, seeds, smp, args.guidance, "loaded", 0, 0.0, [0.0])
        return
    gen = torch.Generator().manual_seed(tcfg.seed)
    by_steps = args.at_steps is not None
    marks = sorted(args.at_steps if by_steps else args.minutes)
    train_s, step, losses = 0.0, 0, []
    while marks:
        t0 = time.perf_counter()
        idx = torch.randint(0, len(prompts), (tcfg.batch_size,), generator=gen)
        ids, mask = student.encode_prompts(drop_prompts([prompts[i] for i in idx], tcfg.cond_drop, rng))
        for g in opt.param_groups:
            g["lr"] = tcfg.lr * min(1.0, (step + 1) / max(tcfg.warmup_steps, 1))
        loss = training_loss(student, ns, images[idx], ids, mask, scfg.prediction_type, tcfg.t_shift, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), tcfg.grad_clip)
        opt.step()
        ema.update(student)
        train_s += time.perf_counter() - t0
        step += 1
        losses.append(loss.item())
        if (step >= marks[0]) if by_steps else (train_s >= marks[0] * 60):
            marks.pop(0)
            evaluated = copy.deepcopy(student)
            ema.copy_to(evaluated)
            evaluate(evaluated, held, seeds, smp, args.guidance, f"{train_s / 60:5.1f}", step, train_s, losses)
    if args.save:
        evaluated.save_pretrained(args.save)


def evaluate(student, held, seeds, smp, guidances, mark, step, train_s, losses) -> None:
    """One line per guidance scale: accuracy overall and per category, and how
    many images failed each of the scorer's checks (what limits the student)."""
    for g in guidances or [smp.guidance]:
        rep = score(held, list(sample(student, held, seeds, smp.model_copy(update={"guidance": g}))))
        print(f"{mark:>5s} {step:6d} {train_s / max(step, 1):7.3f} {np.mean(losses[-50:]):7.4f} "
              f"{rep.overall:6.3f}  " + " ".join(f"{rep.per_category.get(c, 0):10.3f}" for c in CATEGORIES)
              + f"  steps={smp.steps} g={g:g} fails {json.dumps(rep.per_check_failures, sort_keys=True)}",
              flush=True)


if __name__ == "__main__":
    main()
