"""Token inputs of T-REG, AlignDistil and TGDPO from auxiliary models: the credit modules against plain loops, and
the reward side's wiring (one beta for TGDPO, run-supplied tokenizer, teacher logits), errors as one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.config import RecipeError, load_recipe
from align.errors import InputError
from align.trainers.learner import PairBatch
from rewards.credit import CREDIT, CreditInputs
from rewards.credit.contrastive_prompting import split_template, wrap_prompts
from rewards.provider import RecipeRewards

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
V = 12


class PrefixSum:
    """An auxiliary model whose next-token logits depend on the whole context: table[sum(context ids) % V]. Pad id
    0 adds nothing, so left padding does not change it. Implements token_logprobs and logits."""

    def __init__(self, seed: int) -> None:
        self.table = torch.randn(V, V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids.cumsum(-1) % V]  # (B, S, V): position s predicts s + 1

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.logits(input_ids, attention_mask)[:, :-1], -1)
        logp = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros_like(logp[:, :1]), logp], 1)

    def manual(self, context: list[int], token: int) -> float:
        return float(torch.log_softmax(self.table[sum(context) % V], -1)[token])


class LogProbsOnly:
    def __init__(self, inner: PrefixSum) -> None:
        self.inner = inner

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner.token_logprobs(input_ids, attention_mask)


class CharIds:
    """A stand-in tokenizer: one id in 1..V-1 per character; pad 0."""

    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % (V - 1) + 1 for c in text]


PROMPT = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 4]])  # left-padded
PROMPT_MASK = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
IDS = torch.tensor([[3, 1, 2], [4, 4, 0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
REWARDS = torch.tensor([1.0, 0.0], dtype=torch.float64)


def credit_inputs() -> CreditInputs:
    return CreditInputs(rewards=REWARDS, mask=MASK, token_ids=IDS, group_ids=torch.tensor([0, 1]), prompt_ids=PROMPT,
                        prompt_mask=PROMPT_MASK)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-9)


def loop_logp(model: PrefixSum, prefix: list[int], suffix: list[int]) -> torch.Tensor:
    """log pi(y_t | prefix + prompt + suffix, y_<t) by a plain loop over rows and tokens. -> (B, T)."""
    out = torch.zeros(IDS.shape, dtype=torch.float64)
    for i in range(IDS.shape[0]):
        context = prefix + PROMPT[i][PROMPT_MASK[i] != 0].tolist() + suffix
        for t in range(IDS.shape[1]):
            out[i, t] = model.manual(context + IDS[i, :t].tolist(), int(IDS[i, t]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# contrastive_prompting (T-REG)
# ---------------------------------------------------------------------------------------------------------------
def test_wrap_prompts_splices_ids_and_left_pads() -> None:
    ids, mask = wrap_prompts(PROMPT, PROMPT_MASK, [1, 2], [3], pad_id=0)
    close(ids, [[0, 0, 1, 2, 5, 6, 3], [1, 2, 7, 8, 9, 4, 3]])
    close(mask, [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    same, same_mask = wrap_prompts(PROMPT, None, [], [])
    close(same, PROMPT)
    close(same_mask, torch.ones_like(PROMPT))


def test_split_template_needs_one_placeholder() -> None:
    assert split_template("t", "Be good.\n{prompt} Answer:") == ("Be good.\n", " Answer:")
    for bad in ("no placeholder", "{prompt}{prompt}", 3):
        with pytest.raises(InputError, match=r"t must be text holding \{prompt\} exactly once"):
            split_template("t", bad)  # type: ignore[arg-type]


def test_contrastive_prompting_matches_a_loop() -> None:
    model, tok = PrefixSum(1), CharIds()
    better, worse = "Good: {prompt}!", "Bad {prompt}"
    out = CREDIT.get("contrastive_prompting")(credit_inputs(), ref_model=model, tokenizer=tok, better_template=better,
                                              worse_template=worse, outcome_weight=0.0)
    gap = (loop_logp(model, tok.encode("Good: "), tok.encode("!")) - loop_logp(model, tok.encode("Bad "), []))
    expected = (torch.sigmoid(gap) - 0.5) * MASK
    close(out, expected)
    assert out.abs().max() < 0.5 and out[MASK != 0].abs().min() > 0  # the contexts differ at every token here
    with_outcome = CREDIT.get("contrastive_prompting")(credit_inputs(), ref_model=model, tokenizer=tok,
                                                       better_template=better, worse_template=worse)
    close(with_outcome - out, [[0, 0, 1.0], [0, 0, 0]])  # R on each row's last trainable token


def test_contrastive_prompting_with_equal_templates_is_zero_and_needs_a_tokenizer() -> None:
    x = credit_inputs()
    out = CREDIT.get("contrastive_prompting")(x, ref_model=PrefixSum(2), tokenizer=CharIds(),
                                              better_template="A{prompt}", worse_template="A{prompt}",
                                              outcome_weight=0.0)
    close(out, torch.zeros_like(MASK))
    with pytest.raises(InputError, match="needs a tokenizer"):
        CREDIT.get("contrastive_prompting")(x, ref_model=PrefixSum(2))
    with pytest.raises(InputError, match="worse_template must be text"):
        CREDIT.get("contrastive_prompting")(x, ref_model=PrefixSum(2), tokenizer=CharIds(), worse_template="x")


def test_contrastive_dpo_is_beta_log_ratio_plus_outcome() -> None:
    dpo, reverse = PrefixSum(3), PrefixSum(4)
    out = CREDIT.get("contrastive_dpo")(credit_inputs(), dpo_model=dpo, reverse_dpo_model=reverse, beta=0.2)
    expected = 0.2 * (loop_logp(dpo, [], []) - loop_logp(reverse, [], [])) * MASK
    expected[0, 2] += 1.0
    close(out, expected)


# ---------------------------------------------------------------------------------------------------------------
# The reward side: token_credit for treg, aligndistil and tgdpo
# ---------------------------------------------------------------------------------------------------------------
PAIRS = PairBatch(prompt_ids=PROMPT, prompt_mask=PROMPT_MASK, chosen_ids=IDS, chosen_mask=MASK.float(),
                  rejected_ids=torch.tensor([[2, 5], [6, 1]]), rejected_mask=torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
MODELS = {"base": PrefixSum(5), "/models/dpo": PrefixSum(6), "/models/reverse": PrefixSum(7)}


def pair_inputs(side: str) -> CreditInputs:
    ids, mask = getattr(PAIRS, f"{side}_ids"), getattr(PAIRS, f"{side}_mask")
    return CreditInputs(rewards=torch.zeros(2), mask=mask, token_ids=ids, group_ids=torch.arange(2),
                        prompt_ids=PROMPT, prompt_mask=PROMPT_MASK)


def token_credit(recipe_name: str, *overrides: str, loader=MODELS.__getitem__):  # type: ignore[no-untyped-def]
    recipe = load_recipe(RECIPES / f"{recipe_name}.yaml", list(overrides))
    return RecipeRewards().token_credit(recipe, recipe.algorithm_spec(), loader)


def test_tgdpo_token_rewards_use_the_loss_beta() -> None:
    extras = token_credit("tgdpo_tiny_arithmetic", "learner.beta=0.3", "credit.options.dpo_model=/models/dpo")
    assert extras is not None
    rewards = extras(PAIRS)
    dpo, ref = MODELS["/models/dpo"], MODELS["base"]
    x = pair_inputs("chosen")
    expected = 0.3 * (CREDIT.get("implicit_dpo")(x, dpo_model=dpo, ref_model=ref, beta=1.0, outcome_weight=0.0))
    close(rewards["chosen_token_rewards"], expected)
    # an explicit equal value is accepted; a different one is refused at validate, naming both keys
    assert token_credit("tgdpo_tiny_arithmetic", "learner.beta=0.3", "credit.options.beta=0.3") is not None
    with pytest.raises(RecipeError, match=r"credit.options.beta = 0.2 differs from the loss beta 0.3 \(learner.beta"):
        token_credit("tgdpo_tiny_arithmetic", "learner.beta=0.3", "credit.options.beta=0.2")
    with pytest.raises(RecipeError, match=r"algorithm\.overrides\.preference_kwargs\.beta"):
        token_credit("tgdpo_tiny_arithmetic", "credit.options.beta=0.2")  # loss default 0.1


def test_treg_token_rewards_come_from_contrastive_prompting_with_the_run_tokenizer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rewards.provider._RunTokenizer", lambda recipe: CharIds())
    extras = token_credit("treg_tiny_arithmetic", "credit.options.better_template=Yes {prompt}",
                          "credit.options.worse_template=No {prompt}")
    assert extras is not None
    out = extras(PAIRS)
    for side in ("chosen", "rejected"):
        expected = CREDIT.get("contrastive_prompting")(pair_inputs(side), ref_model=MODELS["base"],
                                                       tokenizer=CharIds(), better_template="Yes {prompt}",
                                                       worse_template="No {prompt}", outcome_weight=0.0)
        close(out[f"{side}_token_rewards"], expected)
    assert out["chosen_token_rewards"].abs().sum() > 0


def test_aligndistil_extras_are_the_two_models_logits() -> None:
    extras = token_credit("aligndistil_tiny_arithmetic", "credit.options.dpo_model=/models/dpo",
                          "credit.options.reverse_dpo_model=/models/reverse")
    assert extras is not None
    out = extras(PAIRS)
    assert set(out) == {"chosen_dpo_logits", "chosen_reverse_logits", "rejected_dpo_logits",
                        "rejected_reverse_logits"}
    full = torch.cat([PROMPT, PAIRS.rejected_ids], 1)
    expected = MODELS["/models/reverse"].logits(full, torch.ones_like(full))[:, -3:-1]  # positions predicting y_t
    close(out["rejected_reverse_logits"], expected.float())
    chosen_only = token_credit("aligndistil_tiny_arithmetic", "algorithm.overrides.preference_kwargs.responses=chosen")
    assert chosen_only is not None and set(chosen_only(PAIRS)) == {"chosen_dpo_logits", "chosen_reverse_logits"}
    log_probs_only = token_credit("aligndistil_tiny_arithmetic", loader=lambda path: LogProbsOnly(PrefixSum(0)))
    assert log_probs_only is not None
    with pytest.raises(InputError, match="needs full next-token logits"):
        log_probs_only(PAIRS)


def test_recipe_mistakes_are_one_line() -> None:
    recipe = load_recipe(RECIPES / "treg_tiny_arithmetic.yaml")
    with pytest.raises(RecipeError, match=r"treg takes its token rewards from credit module 'contrastive_prompting'"):
        RecipeRewards().token_credit(recipe.model_copy(update={"credit": None}), recipe.algorithm_spec(),
                                     MODELS.__getitem__)
    for override, match in (("credit.options.tokenizer=x", "the run passes the model's own tokenizer"),
                            ("credit.options.worse_template=Bad", r"'credit.options.worse_template': worse_template")):
        with pytest.raises(RecipeError, match=match):
            RecipeRewards().check(load_recipe(RECIPES / "treg_tiny_arithmetic.yaml", [override]))
    with pytest.raises(RecipeError, match=r"preference_kwargs\.responses': aligndistil distils on 'both' or 'chosen'"):
        token_credit("aligndistil_tiny_arithmetic", "algorithm.overrides.preference_kwargs.responses=rejected")
    with pytest.raises(RecipeError, match=r"credit.options.beta = 0.5 differs from the loss beta 0.1"):
        token_credit("aligndistil_tiny_arithmetic", "credit.options.beta=0.5")


def test_run_tokenizer_loads_once_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from rewards.provider import _RunTokenizer

    calls: list[str] = []
    monkeypatch.setattr("align.build.prepare_base_model", lambda recipe, log: calls.append("base") or "/base")
    monkeypatch.setattr("align.build.load_tokenizer", lambda path, recipe: calls.append(path) or CharIds())
    lazy = _RunTokenizer(load_recipe(RECIPES / "treg_tiny_arithmetic.yaml"))
    assert calls == [] and lazy.loaded is None  # validate builds the parts without loading anything
    assert lazy.encode("ab") == CharIds().encode("ab") and lazy.pad_token_id == 0
    assert calls == ["base", "/base"]


def test_contrastive_prompting_as_policy_credit_gets_the_run_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rewards.provider._RunTokenizer", lambda recipe: CharIds())
    recipe = load_recipe(RECIPES / "grpo_tiny_arithmetic.yaml", ["credit={name: contrastive_prompting, options: "
                                                                 "{ref_model: base}}",
                                                                 "algorithm.overrides.advantage=dense_group"])
    fn = RecipeRewards().credit_function(recipe, MODELS.__getitem__)
    assert fn is not None
    out = fn.module(credit_inputs(), **fn.options)  # type: ignore[attr-defined]
    expected = CREDIT.get("contrastive_prompting")(credit_inputs(), ref_model=MODELS["base"], tokenizer=CharIds())
    close(out, expected)
