"""The pure algorithms, each a thin composition of the bilevel heart.

- `ml3`: Algorithm 1 (the meta-train episode) and Algorithm 2 (meta-test fits) of ML³.
- `adalfl`: AdaLFL's offline initialisation and online lock-step.
- `self_loss`: the self-loss transformer's objectives, critics and hacking detector.

The experiment programs that use them are in `experiments/`.
"""
