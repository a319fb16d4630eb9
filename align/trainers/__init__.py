"""Training loops that compose the core: rollout -> reward -> credit -> advantage -> update -> weight sync.

The loops talk to rollout engines, reward functions and credit modules through the protocols in
:mod:`align.trainers.protocols`, so the same loop runs in-process (transformers generate) or on Ray (vLLM actors,
DeepSpeed learners) with adapters above the core.
"""
