"""Read models folded from the events by the domain's own `evolve`, with their checkpoints."""
