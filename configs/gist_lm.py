"""Gist tokens on tiny_shakespeare (bytes): the bottleneck phase, then self-training in
gist space (research plans 2 and 3).

    python -m experiments.run --config=configs/gist_lm.py:smoke            # plan 2, seconds
    python -m experiments.run --config=configs/gist_lm.py:plan3,smoke      # plan 3
    python -m experiments.run --config=configs/gist_lm.py:bottleneck,k8    # Phase G only
    python -m experiments.sweep_gist                                       # the tables

Phase G (`phase_g.steps`): windows laid out as [context][k gists][chunk], Adam on the
next-token cross-entropy under the gist mask (`algorithms.gist.bottleneck_loss`). Then
Phase 2 (`phase2.steps`), SGD on the gist-space loss alone, with the true
cross-entropies measured as diagnostics and a control trained on the true loss:

- plan 2: 1 − cos per gist slot between E(x̂) and E(x), x̂ the model's predictions of a
  window's last `gist.chunk` tokens, x the observed ones, E the encoder: a copy of the
  model frozen at the end of Phase G (`gist.encoder` 'frozen') or its EMA ('ema');
- plan 3: between E(x̂) and E(x̂ ⊕ x), E learned in lock-step by the one-step
  meta-gradient of the validation cross-entropy (AdaLFL: `algorithms.adalfl.lockstep`).

Variants are comma-separated parts (`:plan3,st,smoke`):
  plan          plan2 (default) | plan3 | bottleneck (Phase G only: the CE(x | gists) table)
  mask          gist (default) | positive (plain causal attention) | negative (the chunk
                sees neither the context nor the gists): Phase G's mask
  gists         k1 | k2 | k4 (default) | k8
  encoder       frozen (default) | ema (plan 2)
  continuation  soft (default) | st (straight-through) | score (sampled, REINFORCE)
  detector      stop | rollback | meta (action on detection; default: continue)
  data          shared (the project's tfds copy) | file (the raw text file)
  size          smoke (seconds on a CPU)
`SWEEP` and `BOTTLENECK` list the runs `experiments.sweep_gist` makes.
"""

import ml_collections

from configs import _text

BOTTLENECK = ("k1", "k2", "k4", "k8", "positive", "negative")
SWEEP = ("plan2", "plan2,ema", "plan2,st", "plan2,score", "plan3", "plan3,st")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "gist_lm"  # the module experiments/gist_lm.py
    c.algorithm = "gist"
    c.task = "lm"
    c.fast_compile = False
    c.seed = 0
    c.data = _text.text_data()
    c.model = _text.transformer()
    c.gist = ml_collections.ConfigDict(
        {
            "plan": "plan2",  # or "plan3" | "bottleneck"
            "k": 4,  # gist tokens
            "mode": "gist",  # Phase G's mask: or "positive" | "negative"
            "context": 24,  # Phase G: the window's first tokens, the compressed context
            "chunk": 16,  # Phase 2: the window's last tokens, the encoded continuation
            "path": "soft",  # or "straight_through" | "score_function"
            "encoder": "frozen",  # plan 2: or "ema"
            "ema_decay": 0.99,
        }
    )
    c.phase_g = ml_collections.ConfigDict(
        {"steps": 3000, "optimizer": {"name": "adam", "lr": 1e-3}}
    )
    c.inner = ml_collections.ConfigDict({"optimizer": {"name": "sgd", "lr": 0.02}})
    # Plan 3: the encoder's optimizer, the split of the batch its meta-objective is
    # measured on, and how the one-step meta-gradient is computed ("jvp" | "backprop").
    c.meta = ml_collections.ConfigDict(
        {"optimizer": {"name": "adam", "lr": 1e-4}, "split": "validation", "method": "jvp"}
    )
    c.phase2 = ml_collections.ConfigDict({"steps": 2000})
    c.detector = _text.detector()
    c.detector.window = 40
    c.diagnostics = ml_collections.ConfigDict({"val_windows": 64})
    c.eval = ml_collections.ConfigDict({"every": 500, "windows": 1024})
    c.log_every = 5
    c.checkpoint_every = 500

    parts = [p for p in (arg or "").split(",") if p]
    g = c.gist
    for part in parts:
        if part in ("plan2", "plan3"):
            g.plan = part
        elif part == "bottleneck":
            g.plan, c.phase2.steps = "bottleneck", 0
        elif part in ("gist", "positive", "negative"):
            g.mode = part
            if part != "gist":
                g.plan, c.phase2.steps = "bottleneck", 0
        elif part in ("k1", "k2", "k4", "k8"):
            g.k = int(part[1:])
        elif part in ("frozen", "ema"):
            g.encoder = part
        elif part == "soft":
            g.path = "soft"
        elif part == "st":
            g.path = "straight_through"
        elif part == "score":
            g.path = "score_function"
        elif part != "smoke":
            _text.shared_part(c, part, "gist_lm")
    if "smoke" in parts:
        _text.smoke_sizes(c)
        g.context, g.chunk = 8, 8
        c.phase_g.steps = 4
        c.phase2.steps = 0 if g.plan == "bottleneck" else 6
        c.detector.meta_steps = 2
        c.eval.every = 2
        c.checkpoint_every = 4
    return c
