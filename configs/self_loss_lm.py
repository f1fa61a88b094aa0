"""The self-loss transformer on tiny_shakespeare (bytes): meta-train, then self-train.

    python -m experiments.run --config=configs/self_loss_lm.py:smoke         # seconds
    python -m experiments.run --config=configs/self_loss_lm.py:frozen,hard   # a variant
    python -m experiments.sweep_self_loss                                    # every variant

Phase 1 (`meta.steps`): one inner SGD step on the model's own predicted loss, the true
cross-entropy of another batch at θ', the outer Adam step through the inner step, then
θ ← (1 − τ)θ + τθ'. Phase 2 (`phase2.steps`): SGD on the predicted loss alone, with the
true cross-entropies measured as diagnostics and a control trained on the true loss.

Variants are comma-separated parts (`:frozen,hard,smoke`):
  critic        same (default) | same_sg (same, stop-gradient through its weights) |
                frozen | ema
  prediction    soft (default) | st (straight-through) | hard
  signal        targets (self-produced target distributions instead of a scalar);
                continuation (the targets critic also reads the observed continuation);
                observed (targets from the critic stack: the input, the model's
                prediction and the observed next token; implies targets); gain (the
                same stack with only a learned trust in the observed token)
  critic        refresh (a frozen critic copy refreshed from θ every 200 Phase 2 steps)
  meta-training long (1,000 Phase 1 steps instead of 200); adversarial (the critic
                meta-trained on the model's drift: 3 inner steps on its targets, all
                differentiated, before the true loss)
  mitigations   positive (smooth leaky ReLU output) | softplus | head (separate loss
                head) | disjoint (disjoint upper layers) | mono (monotonicity penalty) |
                norm (batch-normalised predicted loss) | anchor (true-CE step every 20) |
                first_order | truncated (3 inner steps, the last one differentiated:
                estimator last_window) | es (the meta-gradient by antithetic ES from
                forward unrolls: on hard tokens it sees how θ moves the token choice)
  detector      stop | rollback | meta (action on detection; default: continue)
  layout        prefix (loss pass continues the LM pass's keys and values)
  data          file (read ../shared/data/raw/tiny_shakespeare/input.txt as a text file)
  size          smoke (seconds on a CPU); gpu (6 layers, d = 384, context 256, batch 64,
                1,000 + 3,000 steps: minutes on one GPU)
`SWEEP` lists the variants `experiments.sweep_self_loss` runs.
"""

import ml_collections

from configs import _text

# The sweep: the document's setting ([LOSS] scalar read as the mean of the output,
# unconstrained, hard tokens, the same live weights), each prediction path and critic,
# each mitigation on top of the document's setting, and self-produced targets.
SWEEP = (
    "hard",
    "soft",
    "st",
    "same_sg,soft",
    "frozen,hard",
    "frozen,soft",
    "ema,soft",
    "hard,positive",
    "hard,head",
    "hard,norm",
    "hard,mono",
    "hard,disjoint",
    "hard,anchor",
    "hard,first_order",
    "hard,truncated",
    "targets",
    "targets,continuation",
    "targets,frozen,continuation",
    "targets,ema,continuation",
    # A critic that can produce targets worth learning from: its critic stack reads the
    # observed next token, with a learned trust in it alone (gain) or also free
    # embeddings of it and of the model's prediction (observed); each critic and lever.
    "observed,frozen",
    "gain,frozen",
    "gain",
    "gain,same_sg",
    "gain,ema",
    "gain,refresh",
    "gain,frozen,long",
    "gain,frozen,adversarial",
    "observed,frozen,adversarial",
    "gain,meta",
    "targets,frozen,continuation,long",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "self_loss_lm"  # the module experiments/self_loss_lm.py
    c.algorithm = "self_loss"
    c.task = "lm"
    c.fast_compile = False  # most XLA optimisations off (smoke runs: compile-bound)
    c.seed = 0
    c.data = _text.text_data()
    c.model = _text.transformer()
    c.self_loss = ml_collections.ConfigDict(
        {
            "signal": "scalar",  # or "targets"
            "path": "soft",  # or "straight_through" | "hard"
            "output": "identity",  # or "softplus" | "smooth_leaky_relu"
            "normalise": False,
            "critic": "same",  # or "frozen" | "ema"
            "stop_gradient": False,
            "ema_decay": 0.99,
            "sees": "input",  # targets: or "input_and_continuation" | "observed"
            # sees="observed": what the critic stack learns: "gain" (trust in the
            # observed token) or "embed" (also embeddings of it and of the prediction).
            "observe": "embed",
            "layout": "separate",  # or "shared_prefix"
            "monotonicity": 0.0,
        }
    )
    c.inner = ml_collections.ConfigDict({"optimizer": {"name": "sgd", "lr": 0.02}})
    c.meta = ml_collections.ConfigDict(
        {
            "steps": 200,
            "optimizer": {"name": "adam", "lr": 1e-3},
            "inner_steps": 1,
            "estimator": "unrolled",  # or "first_order" | "last_window" | "es"
            "window": 1,  # last_window: the last inner steps, the ones differentiated
            # es: the std σ of the perturbation of every weight of θ, and the antithetic
            # pairs (2 × pairs forward unrolls a meta step).
            "estimator_options": {"sigma": 0.01, "pairs": 8},
            "remat": False,  # recompute inner steps on the backward pass (memory for time)
            "tau": 0.1,
            "split": "train",  # the outer batch's split: or "validation"
            # > 0: the critic's own parameters (the `loss` group) at this Adam rate.
            "critic_lr": 0.0,
        }
    )
    # refresh_every: a frozen or EMA critic copy becomes θ every this many steps (0: never).
    c.phase2 = ml_collections.ConfigDict({"steps": 400, "anchor_every": 0, "refresh_every": 0})
    c.detector = _text.detector()
    c.diagnostics = ml_collections.ConfigDict({"val_windows": 64})
    c.eval = ml_collections.ConfigDict({"every": 100, "windows": 256})
    c.log_every = 5
    c.checkpoint_every = 200

    parts = [p for p in (arg or "").split(",") if p]
    s = c.self_loss
    for part in parts:
        if part in ("same", "frozen", "ema"):
            s.critic = part
        elif part == "same_sg":
            s.critic, s.stop_gradient = "same", True
        elif part in ("soft", "hard"):
            s.path = part
        elif part == "st":
            s.path = "straight_through"
        elif part == "targets":
            s.signal = "targets"
        elif part == "continuation":
            s.sees = "input_and_continuation"
        elif part in ("observed", "gain"):
            s.signal, s.sees = "targets", "observed"
            s.observe = "embed" if part == "observed" else "gain"
            c.meta.critic_lr = 0.03
        elif part == "refresh":
            s.critic, c.phase2.refresh_every = "frozen", 200
        elif part == "long":
            c.meta.steps = 1000
        elif part == "adversarial":
            c.meta.inner_steps, c.meta.estimator = 3, "unrolled"
        elif part == "gpu":
            c.model.update({"context": 256, "num_layers": 6, "d_model": 384, "num_heads": 6})
            c.data.batch_size = 64
            c.meta.steps = max(c.meta.steps, 1000)
            c.phase2.steps = 3000
            c.eval.windows = 512
            c.diagnostics.val_windows = 128
        elif part == "positive":
            s.output = "smooth_leaky_relu"
        elif part == "softplus":
            s.output = "softplus"
        elif part == "head":
            c.model.readout = "head"
        elif part == "disjoint":
            c.model.num_layers, c.model.loss_layers = 3, 1
        elif part == "mono":
            s.monotonicity = 1.0
        elif part == "norm":
            s.normalise = True
        elif part == "anchor":
            c.phase2.anchor_every = 20
        elif part == "first_order":
            c.meta.estimator = "first_order"
        elif part == "es":
            c.meta.estimator = "es"
        elif part == "truncated":
            c.meta.inner_steps, c.meta.estimator, c.meta.window = 3, "last_window", 1
        elif part == "prefix":
            s.layout = "shared_prefix"
        elif part != "smoke":
            _text.shared_part(c, part, "self_loss_lm")
    if "smoke" in parts:
        _text.smoke_sizes(c)
        c.meta.steps = 8 if "long" in parts else 4
        c.phase2.steps = 8
        c.phase2.anchor_every = min(c.phase2.anchor_every, 3)
        c.phase2.refresh_every = min(c.phase2.refresh_every, 3)
        c.detector.meta_steps = 2
        c.eval.every = 4
        c.checkpoint_every = 4
    return c
