"""An independent reference learner: a minimal PPO on envpool Atari, to compare learning per frame with lit_impala's.

Why it exists: when the learner does not learn a game (Pong, docs/results.md#atari), the question is whether the
learner is at fault or the setting (frames, network, budget) is. This is a second learner written from the PPO paper
and CleanRL's published Atari settings, sharing no code with ``lit_impala``: one process, envpool's sync vector env,
GAE, clipped surrogate, the DQN Nature network. Same envpool frames as ``data.env_backend: envpool`` with the same
``atari_options`` (no-ops, frame skip 4, max-pool, grayscale, 4 stacked frames, no sticky actions, minimal actions),
the game score as the logged return, rewards clipped to their sign for learning, a lost life terminal for learning
only (CleanRL's episodic life; Pong has none).

    python -m benchmarks.reference_ppo --env-id ALE/Pong-v5 --screen-size 42 --agent-steps 2000000
    python -m benchmarks.reference_ppo --screen-size 84 --agent-steps 1000000      # CleanRL's frames

It prints a line every ~20K agent steps and a table at the end (Ctrl-C ends it there too, exit 130), and writes
``results/reference_ppo_<game>_<size>.json`` (the curve: agent steps, seconds, mean game score of the last 100
episodes, policy entropy; ``interrupted``: ended by Ctrl-C). Settings (CleanRL's
``ppo_atari_envpool``): 8 envs x 128 steps per batch, 4 epochs x 4 minibatches of single steps, Adam 2.5e-4
annealed to 0, clip 0.1, GAE lambda 0.95, gamma 0.99, value weight 0.5 with a clipped value loss, entropy 0.01,
gradient norm 0.5, advantages normalised per minibatch.
"""

from __future__ import annotations

import math
import signal
import sys
import time

import numpy as np
import torch
from torch import nn

from benchmarks.common import OneLineErrorParser, print_table, write_result

GAMMA, GAE_LAMBDA, CLIP, VALUE_WEIGHT, ENTROPY_WEIGHT, MAX_GRAD_NORM, LR = 0.99, 0.95, 0.1, 0.5, 0.01, 0.5, 2.5e-4
EPOCHS, MINIBATCHES, STEPS_PER_ENV = 4, 4, 128


def parse_args(argv):
    parser = OneLineErrorParser(prog="python -m benchmarks.reference_ppo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--env-id", default="ALE/Pong-v5", help="an ALE id envpool has (ALE/Pong-v5 -> Pong-v5)")
    parser.add_argument("--screen-size", type=int, default=42, help="square frames; the Nature network needs >= 36")
    parser.add_argument("--agent-steps", type=int, default=2_000_000)
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.screen_size < 36:
        parser.error(f"--screen-size {args.screen_size} is below 36, the smallest frame the Nature network takes")
    if args.envs < 1 or args.agent_steps < args.envs * STEPS_PER_ENV:
        parser.error(f"--agent-steps {args.agent_steps} is less than one batch ({args.envs} envs x {STEPS_PER_ENV})")
    return args


def _layer(module: nn.Module, gain: float = math.sqrt(2)) -> nn.Module:
    nn.init.orthogonal_(module.weight, gain)
    nn.init.zeros_(module.bias)
    return module


class NatureActorCritic(nn.Module):
    """uint8 frames ``[N, 4, S, S]`` -> (logits ``[N, A]``, value ``[N]``): the DQN Nature torso, 512 features."""

    def __init__(self, screen_size: int, num_actions: int):
        super().__init__()
        self.torso = nn.Sequential(
            _layer(nn.Conv2d(4, 32, 8, stride=4)), nn.ReLU(),
            _layer(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            _layer(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten(),
        )
        flat = self.torso(torch.zeros(1, 4, screen_size, screen_size)).shape[1]
        self.features = nn.Sequential(_layer(nn.Linear(flat, 512)), nn.ReLU())
        self.policy = _layer(nn.Linear(512, num_actions), gain=0.01)  # a near-uniform first policy
        self.value = _layer(nn.Linear(512, 1), gain=1.0)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.features(self.torso(frames.float() / 255.0))
        return self.policy(hidden), self.value(hidden).squeeze(-1)


def gae(rewards, values, terminals, bootstrap_value):
    """Advantages ``[T, N]`` by GAE(lambda). ``terminals[t]``: the step t ended an episode (no bootstrap past it);
    ``bootstrap_value [N]``: V of the observation after the last step."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(bootstrap_value)
    next_value = bootstrap_value
    for t in reversed(range(rewards.shape[0])):
        carry = 1.0 - terminals[t]
        delta = rewards[t] + GAMMA * next_value * carry - values[t]
        running = delta + GAMMA * GAE_LAMBDA * carry * running
        advantages[t] = running
        next_value = values[t]
    return advantages


def make_env(args):
    from lit_impala.envs.envpool import envpool_task_id, import_envpool  # its import quirks undone; no learner code

    return import_envpool().make(
        envpool_task_id(args.env_id), env_type="gymnasium", num_envs=args.envs, batch_size=args.envs, seed=args.seed,
        img_height=args.screen_size, img_width=args.screen_size, stack_num=4, frame_skip=4, noop_max=30,
        repeat_action_probability=0.0, episodic_life=False, reward_clip=False, use_fire_reset=False, num_threads=1,
    )


class CtrlC:
    """The first Ctrl-C is a request the loop reads between env steps (``requested``); a second one interrupts at
    once (``KeyboardInterrupt``). Why a handler of our own: a command started by a parent that ignores SIGINT (a
    background job of a script, ``nohup ... &``: the test suite run that way) inherits the ignore, and Python then
    installs no ``KeyboardInterrupt`` at all; a run stopped with SIGINT there went on training. The first request
    also ends the run between env steps, not inside one."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


def train(args) -> tuple[list[dict], bool]:
    """``(curve, interrupted)``: one point per batch; ``interrupted``: Ctrl-C ended it early (the batch in progress
    is dropped)."""
    torch.manual_seed(args.seed)
    env = make_env(args)
    network = NatureActorCritic(args.screen_size, int(env.action_space.n))
    optimizer = torch.optim.Adam(network.parameters(), lr=LR, eps=1e-5)
    T, N = STEPS_PER_ENV, args.envs
    frames = torch.zeros(T, N, 4, args.screen_size, args.screen_size, dtype=torch.uint8)
    actions, log_probs, rewards, terminals, values = (torch.zeros(T, N, dtype=dtype) for dtype in
                                                     (torch.long, torch.float32, torch.float32, torch.float32,
                                                      torch.float32))
    observation, info = env.reset()
    lives = info["lives"]
    score, scores, curve = np.zeros(N), [], []
    batches, start = args.agent_steps // (T * N), time.monotonic()
    ctrl_c = CtrlC()
    try:
        for batch in range(batches):
            for group in optimizer.param_groups:
                group["lr"] = LR * (1 - batch / batches)
            for t in range(T):
                if ctrl_c.requested:
                    raise KeyboardInterrupt
                frames[t] = torch.as_tensor(observation)
                with torch.no_grad():
                    logits, values[t] = network(frames[t])
                policy = torch.distributions.Categorical(logits=logits)
                actions[t] = policy.sample()
                log_probs[t] = policy.log_prob(actions[t])
                observation, reward, terminated, truncated, info = env.step(actions[t].numpy())
                rewards[t] = torch.as_tensor(np.sign(reward), dtype=torch.float32)
                life_lost = info["lives"] < lives
                lives = info["lives"]
                terminals[t] = torch.as_tensor(terminated | truncated | life_lost, dtype=torch.float32)
                score += reward
                for i in np.flatnonzero(terminated | truncated):
                    scores.append(float(score[i]))
                    score[i] = 0.0
                    # envpool resets a finished env inside its next step, which ignores the action: that step (final
                    # frame -> the next game's first, reward 0) is learnt like any other, as CleanRL's PPO does.
            with torch.no_grad():
                _, bootstrap_value = network(torch.as_tensor(observation))
            advantages = gae(rewards, values, terminals, bootstrap_value)
            returns = advantages + values
            flat = [x.flatten(0, 1) for x in (frames, actions, log_probs, advantages, returns, values)]
            entropies = []
            for _ in range(EPOCHS):
                for index in torch.randperm(T * N).chunk(MINIBATCHES):
                    b_frames, b_actions, b_log_probs, b_advantages, b_returns, b_values = (x[index] for x in flat)
                    logits, value = network(b_frames)
                    policy = torch.distributions.Categorical(logits=logits)
                    ratio = (policy.log_prob(b_actions) - b_log_probs).exp()
                    advantage = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)
                    policy_loss = torch.max(-advantage * ratio, -advantage * ratio.clamp(1 - CLIP, 1 + CLIP)).mean()
                    clipped_value = b_values + (value - b_values).clamp(-CLIP, CLIP)
                    value_loss = 0.5 * torch.max((value - b_returns) ** 2, (clipped_value - b_returns) ** 2).mean()
                    entropy = policy.entropy().mean()
                    loss = policy_loss + VALUE_WEIGHT * value_loss - ENTROPY_WEIGHT * entropy
                    optimizer.zero_grad()
                    loss.backward()
                    nn.utils.clip_grad_norm_(network.parameters(), MAX_GRAD_NORM)
                    optimizer.step()
                    entropies.append(entropy.item())
            point = {"agent_steps": (batch + 1) * T * N, "seconds": round(time.monotonic() - start, 1),
                     "return_last_100": float(np.mean(scores[-100:])) if scores else None, "episodes": len(scores),
                     "entropy": round(float(np.mean(entropies)), 4)}
            curve.append(point)
            if batch % max(1, 20_000 // (T * N)) == 0 or batch == batches - 1:
                print(" ".join(f"{key} {value}" for key, value in point.items()), flush=True)
    except KeyboardInterrupt:  # Ctrl-C: the curve so far is the result (its last point says how far it got)
        print(f"stopped by Ctrl-C after {len(curve)} of {batches} batches", flush=True)
        return curve, True
    finally:
        ctrl_c.restore()
        env.close()
    return curve, False


def main(argv=None) -> int:
    args = parse_args(argv)
    curve, interrupted = train(args)
    if not curve:
        print("no batch finished: nothing written", flush=True)
        return 130
    marks = sorted({min(len(curve), max(1, round(len(curve) * k / 10))) - 1 for k in range(1, 11)})
    print_table(f"reference PPO on {args.env_id}, {args.screen_size}x{args.screen_size} frames, seed {args.seed}",
                ["agent steps", "seconds", "return (last 100)", "entropy"],
                [[curve[i]["agent_steps"], curve[i]["seconds"], curve[i]["return_last_100"], curve[i]["entropy"]]
                 for i in marks])
    game = args.env_id.removeprefix("ALE/").split("-")[0].lower()
    write_result(f"reference_ppo_{game}_{args.screen_size}",
                 {"command": " ".join(["python -m benchmarks.reference_ppo", *(argv if argv is not None else
                                                                                sys.argv[1:])]),
                  "settings": {"env_id": args.env_id, "screen_size": args.screen_size, "envs": args.envs,
                               "seed": args.seed, "agent_steps": args.agent_steps},
                  "final": curve[-1], "interrupted": interrupted, "curve": curve})
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
