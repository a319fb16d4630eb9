"""The distributed runtime: Ray actors for vLLM rollouts, DeepSpeed learners and reward workers.

The only package of the project that imports ray, vllm or deepspeed; it adapts them to the protocols the core owns.
"""
