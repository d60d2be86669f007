"""The training core of the trainer worker: plain Python, no Celery, no Redis.

    tokenize      Trajectory -> one token sequence with the sampled-token mask
    advantages    group-relative advantages
    loss          PPO-clip / CISPO policy losses and the k3 KL, as pure functions
    packing       sequences -> micro-batches under a token budget
    checkpoints   the on-disk checkpoint layout, written atomically
    trainer       ``Trainer``: register, train (exactly once), delete checkpoints
    world         where a step runs: one process, or one rank of a group (the hooks ``Trainer`` calls)
    fsdp          ``FSDPWorld``: a rank of a torch.distributed group training one model with FSDP2

Importing this package imports no torch; its modules do.
"""

__all__: list[str] = []  # a map of the package; import its modules
