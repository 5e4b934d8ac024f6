"""RL/RLVR: deterministic verifiers and their certification, the sandbox for untrusted code, rollout difficulty."""
