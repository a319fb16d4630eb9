"""Reward functions and credit assignment (sequence rewards -> token rewards), built on :mod:`align`.

Importable with torch alone: this package never imports ray, vllm or deepspeed.
"""
