"""Multi-turn rollouts on a real BPE chat model (SmolLM2-135M-Instruct, converted offline from its pinned package):
the tool observation goes in as a ``tool`` message of the model's own chat template, and the learner's forward over
the whole episode gives the log-probs the engine sampled with. About 20 s on 2 cores."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from align.build import cache_root
from align.config import load_recipe
from align.envs import ChatObservations, MultiTurnEngine, StepResult
from align.models.named import prepare_named_model
from align.trainers.protocols import SamplingParams
from align.trainers.rollout_hf import HFRolloutEngine
from align.trainers.sequences import encode, response_forward

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SYSTEM = ("You can use a calculator: write <calc>EXPRESSION</calc> and you will get <result>VALUE</result>. "
          "Then answer with the number only.")


class OneToolReply:
    """Replies to the first turn with a tool result, whatever the model wrote; the second turn ends the episode."""

    def reset(self, prompt: str, columns: Mapping[str, Any]) -> None:
        self.turns = 0

    def step(self, action: str) -> StepResult:
        self.turns += 1
        return StepResult(observation="<result>5535</result>", done=self.turns == 2)


def test_a_tool_message_in_the_chat_template_keeps_the_sampled_log_probs() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = prepare_named_model("smollm2-135m-instruct", cache_root(load_recipe(ROOT / "recipes" /
                                                                                   "lora_smollm2.yaml")),
                                    log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                            {"role": "user", "content": "What is 123*45?"}],
                                           tokenize=False, add_generation_prompt=True)
    observations = ChatObservations(tokenizer, "tool")
    engine = MultiTurnEngine(HFRolloutEngine(model, tokenizer), OneToolReply, tokenizer, max_turns=2,
                             observations=observations, max_total_tokens=96)
    rollout = engine.generate([prompt], {}, samples_per_prompt=2, params=SamplingParams(max_new_tokens=24), seed=0)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    for row in range(2):
        ids, mask = rollout.completion_ids[row].tolist(), rollout.mask[row].tolist()
        first_end = rollout.columns["turn_ends"][row][0]
        eos = ids[first_end] == tokenizer.eos_token_id
        observation = observations("<result>5535</result>", eos)
        # the tool message and the assistant prefix, as the template writes them, tokenised once, mask 0
        assert ids[first_end + 1 : first_end + 1 + len(observation)] == observation
        assert set(mask[first_end + 1 : first_end + 1 + len(observation)]) == {0.0}
        assert start in observation and encode(tokenizer, ["<|im_start|>tool\n"])[0][0] == start
    with torch.no_grad():
        logp, _, _ = response_forward(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                      rollout.mask)
    gap = float(((logp - rollout.logp).abs() * rollout.mask).max())
    assert gap < 1e-3, gap
    assert all(n == 2 for n in rollout.columns["num_turns"])
