"""Environment steps per second of the brax goal environments (MuJoCo MJX), as a table.

    python -m benchmarks.goal_envs                            # reacher and ant, CPU sizes
    python -m benchmarks.goal_envs --envs=ant --batch=256,1024,4096 --steps=100

For each environment and batch size: one jitted program that resets `batch` episodes to
random goals and steps them `steps` times under `lax.scan` with random actions in [-1, 1]
(what an ML³ or PPO rollout costs without the policy). Reports the compile + first call
time and the steady env steps/s over `repeats` later calls. `--json=FILE` appends each
row to FILE as a JSON line as soon as it is measured.
"""

import argparse
import json
import time


def measure(name: str, batch: int, steps: int, repeats: int) -> dict:
    import jax

    from metalearn.tasks import goal_envs

    env = goal_envs.make_env(name)

    @jax.jit
    def run(key):
        goals = goal_envs.sample_goals(name, key, batch)
        states = jax.vmap(env.reset_to)(jax.random.split(key, batch), goals)

        def body(s, k):
            a = jax.random.uniform(k, (batch, env.action_size), minval=-1.0, maxval=1.0)
            s = jax.vmap(env.step)(s, a)
            return s, s.reward

        return jax.lax.scan(body, states, jax.random.split(key, steps))[1]

    start = time.perf_counter()
    jax.block_until_ready(run(jax.random.key(0)))
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(1, repeats + 1):  # key 0 was the first call's
        jax.block_until_ready(run(jax.random.key(i)))
    seconds = (time.perf_counter() - start) / repeats
    return {"first": first, "steps_per_s": batch * steps / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", default="reacher,ant")
    parser.add_argument("--batch", default="16,64,256")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="append each row to this file as a JSON line")
    args = parser.parse_args()

    import jax

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| env | batch | compile + first call (s) | env steps/s |")
    print("|---|---|---|---|")
    for name in args.envs.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            r = measure(name, batch, args.steps, args.repeats)
            print(f"| {name} | {batch} | {r['first']:.1f} | {r['steps_per_s']:,.0f} |", flush=True)
            if args.json:
                row = {"env": name, "batch": batch, "steps": args.steps, **r}
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
