"""ML building blocks, reinforcement learning: complete episodes from gymnasium, discounted returns and
GAE (rollouts.py), and the offline CartPole datasets of three behaviour qualities (offline.py)."""
