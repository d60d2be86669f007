"""Training one model on a torchrun group (FSDP2), fed by the Celery child.

    protocol   the records between the child and rank 0, and between rank 0 and the other ranks
    client     ``GroupTrainer``: the child's side; starts torchrun, forwards calls, restarts a failed group
    rank       one rank: rank 0 serves the child's calls, the others follow it
    launch     torchrun's command line, a torchrun that ends with its parent, other nodes' loop
"""

__all__: list[str] = []  # a map of the package; import its modules
