"""Credit-assignment modules on hand-built inputs (masks with holes), sums they promise, and a contract."""

from __future__ import annotations

import statistics

import pytest
import torch

from align.errors import InputError
from align.models.tiny import build_char_tokenizer
from align.ops import discounted_returns
from rewards.credit import CREDIT, CausalLMScorer, CreditInputs, explain

# row 0: hole at 2, padding at 4; row 1: padding at 3-4; row 2: hole at 0 (tool output)
MASK = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.float64)
REWARDS = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
GROUPS = torch.tensor([0, 0, 1])
IDS = torch.tensor([[5, 9, 7, 3, 0], [5, 9, 4, 0, 0], [9, 9, 1, 2, 3]])


def inputs(**kw) -> CreditInputs:
    base = {"rewards": REWARDS, "mask": MASK, "token_ids": IDS, "group_ids": GROUPS}
    return CreditInputs(**{**base, **kw})


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=0, atol=1e-9)


def test_uniform_and_last_token_exact_and_same_totals() -> None:
    u = CREDIT.get("uniform")(inputs())
    last = CREDIT.get("last_token")(inputs())
    close(u, [[1 / 3, 1 / 3, 0, 1 / 3, 0], [0, 0, 0, 0, 0], [0, 0.5, 0.5, 0.5, 0.5]])
    close(last, [[0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 2]])
    close(u.sum(-1), REWARDS)
    close(last.sum(-1), REWARDS)


def test_discounted_recovers_discounted_returns_through_reward_to_go() -> None:
    r = CREDIT.get("discounted")(inputs(), gamma=0.5)
    close(r[0], [-0.25, -0.5, 0, 1, 0])
    close(discounted_returns(r, MASK, gamma=1.0)[0], [0.25, 0.5, 0, 1, 0])
    close(r.sum(-1), [0.25, 0.0, 2 * 0.5**3])  # G at the first trainable token


def test_prm_steps_places_scores_at_step_ends() -> None:
    steps = [[0.2, 0.8], [0.5, -0.5], [1.0, 1.0]]
    out = CREDIT.get("prm_steps")(inputs(step_rewards=steps), delimiter_ids=[9])
    # row 0: delimiter at 1, last token 3; row 1: delimiter 9 at 1, last at 2; row 2: delimiter at 1, last at 4
    close(out, [[0, 0.2, 0, 0.8, 0], [0, 0.5, -0.5, 0, 0], [0, 1.0, 0, 0, 1.0]])
    pooled = [0.2, 0.8, 0.5, -0.5]
    mu, sd = statistics.mean(pooled), statistics.stdev(pooled)
    normed = CREDIT.get("prm_steps")(inputs(step_rewards=steps), delimiter_ids=[9], normalize=True, eps=0.0)
    close(normed[0, 1], (0.2 - mu) / sd)
    close(normed[1, 2], (-0.5 - mu) / sd)
    close(normed[2], [0, 0, 0, 0, 0])  # equal scores in a group normalise to 0, not 0/0
    with pytest.raises(InputError, match="row 0 has 2 steps"):
        CREDIT.get("prm_steps")(inputs(step_rewards=[[1.0], [0.5, -0.5], [1.0, 1.0]]), delimiter_ids=[9])
    by_predicate = CREDIT.get("prm_steps")(inputs(step_rewards=steps), is_delimiter=lambda t: t == 9)
    close(by_predicate, out)


def test_prm_steps_normalised_then_dense_group_is_grpo_prm() -> None:
    """GRPO process supervision (arXiv 2402.03300 §4.1.3): A_{i,t} = sum of the normalised scores of the steps that
    end at or after t, normalised once.

    Step scores [[1, 1], [0]] in one group: mean 2/3, Bessel std sqrt(((1/3)^2 * 2 + (2/3)^2) / 2) = sqrt(1/3), so
    r~ = (1/3)/(sqrt(1/3) + eps) = 0.57735 for each 1 and -(2/3)/(sqrt(1/3) + eps) = -1.1547 for the 0. Row 0 (steps
    end at the delimiter 9 at 0 and at the last token 2) gets A = [1.1547, 0.57735, 0.57735]; row 1 [-1.1547] * 2.
    The totals +-1.1547 have group mean 0 (normalised scores sum to 0), so dense_group with scale_by_std=False adds
    nothing; its default would divide by their Bessel std 1.633 again (0.7071), which the spec check refuses.
    """
    from align.advantages import ADVANTAGES
    from align.algorithms import GRPO
    from align.errors import IncompatibleSpecError

    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    x = CreditInputs(rewards=torch.zeros(2, dtype=torch.float64), mask=mask,
                     token_ids=torch.tensor([[9, 4, 5], [4, 5, 0]]), group_ids=torch.zeros(2, dtype=torch.long),
                     step_rewards=[[1.0, 1.0], [0.0]])
    with pytest.raises(IncompatibleSpecError, match=r"divide them by the group std a second time.*scale_by_std"):
        GRPO.with_options(name="grpo_prm", credit="prm_steps", advantage="dense_group")
    spec = GRPO.with_options(name="grpo_prm", credit="prm_steps", advantage="dense_group",
                             advantage_kwargs={"scale_by_std": False})
    rewards = CREDIT.get("prm_steps")(x, delimiter_ids=[9], normalize=True)
    adv = ADVANTAGES.get(spec.advantage)(rewards, mask, x.group_ids, **spec.advantage_kwargs)
    one, zero = (1 / 3) / (3 ** -0.5 + 1e-6), -(2 / 3) / (3 ** -0.5 + 1e-6)
    close(adv, [[2 * one, one, one], [zero, zero, 0]])
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.1547, -1.1547], dtype=torch.float64), rtol=0, atol=1e-4)
    twice = ADVANTAGES.get("dense_group")(rewards, mask, x.group_ids)  # what the refused default computes
    torch.testing.assert_close(twice[:, 0], torch.tensor([0.7071, -0.7071], dtype=torch.float64), rtol=0, atol=1e-4)


class Bigram:
    """A tiny auxiliary model: next-token logits = table[previous token]. Implements both protocols."""

    def __init__(self, seed: int, vocab: int = 10) -> None:
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]  # (B, S, V): position s predicts s + 1

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.table[input_ids[:, :-1]], -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros_like(logp[:, :1]), logp], 1)


class LogProbsOnly:
    def __init__(self, inner: Bigram) -> None:
        self.inner = inner

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner.token_logprobs(input_ids, attention_mask)


PROMPT = torch.tensor([[1, 2], [1, 2], [3, 4]])


def manual_logp(model: Bigram, prompt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(ids.shape, dtype=torch.float64)
    for i in range(ids.shape[0]):
        seq = prompt[i].tolist() + ids[i].tolist()
        for t in range(ids.shape[1]):
            prev, tok = seq[prompt.shape[1] + t - 1], seq[prompt.shape[1] + t]
            out[i, t] = torch.log_softmax(model.table[prev], -1)[tok]
    return out


def test_implicit_dpo_is_beta_log_ratio_plus_outcome() -> None:
    dpo, ref = Bigram(1), Bigram(2)
    out = CREDIT.get("implicit_dpo")(inputs(prompt_ids=PROMPT), dpo_model=dpo, ref_model=ref, beta=0.1)
    expected = 0.1 * (manual_logp(dpo, PROMPT, IDS) - manual_logp(ref, PROMPT, IDS)) * MASK
    expected[0, 3] += 1.0
    expected[2, 4] += 2.0
    close(out, expected)
    clipped = CREDIT.get("implicit_dpo")(inputs(prompt_ids=PROMPT), dpo_model=dpo, ref_model=ref, beta=0.1,
                                         clip=0.05, outcome_weight=0.0)
    assert clipped.abs().max() <= 0.05 + 1e-12
    with pytest.raises(InputError, match="token_logprobs"):
        CREDIT.get("implicit_dpo")(inputs(), dpo_model=object(), ref_model=ref)


def test_contrastive_critical_exact_and_log_prob_fallback() -> None:
    pos, neg = Bigram(3), Bigram(4)
    out = CREDIT.get("contrastive_critical")(inputs(prompt_ids=PROMPT), positive_model=pos, negative_model=neg)
    # group 0: row 0 (R=1) positive, row 1 (R=0) negative; group 1 has one row (not below its own mean)
    seq = torch.cat([PROMPT, IDS], 1)
    t = 1  # row 1, response position 1 (token 9, predicted from token 5)
    combined = 2 * pos.table[seq[1, PROMPT.shape[1] + t - 1]] - neg.table[seq[1, PROMPT.shape[1] + t - 1]]
    s = torch.softmax(combined, -1)[9]
    close(out[1, t], 1 - s)
    close(out[0], MASK[0])
    close(out[2], MASK[2])
    approx = CREDIT.get("contrastive_critical")(inputs(prompt_ids=PROMPT), positive_model=LogProbsOnly(pos),
                                                negative_model=LogProbsOnly(neg))
    assert ((approx >= 0) & (approx <= 1)).all()


def test_contrastive_critical_gives_the_eos_weight_one() -> None:
    """The authors' cDPO code gives the EOS weight 1 on both sides (chosen: scores + [1]; rejected: 1 - (scores +
    [0])), the scores covering only the response text.

    Log-probs only (the min(1, .) fallback): log p+ = log 0.5, log p- = log 0.8, lam = 1, so s = 0.5^2 / 0.8 = 0.3125
    and a negative completion's weight is 1 - s = 0.6875. Row 0 (R = 1, positive) is truncated, its last token 8 is
    no EOS; row 1 (R = 0, negative) ends with EOS id 2 at position 2. With eos_token_id=None the last trainable
    token of each row is taken as the EOS; with eos_token_id=2 only row 1's is.
    """
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.float64)
    x = CreditInputs(rewards=torch.tensor([1.0, 0.0], dtype=torch.float64), mask=mask,
                     token_ids=torch.tensor([[5, 6, 7, 8], [5, 6, 2, 0]]), group_ids=torch.zeros(2, dtype=torch.long),
                     prompt_ids=torch.ones(2, 2, dtype=torch.long))
    models = {"positive_model": FixedLogProbs(torch.full((2, 4), 0.5, dtype=torch.float64).log()),
              "negative_model": FixedLogProbs(torch.full((2, 4), 0.8, dtype=torch.float64).log())}
    module = CREDIT.get("contrastive_critical")
    close(module(x, **models), [[1, 1, 1, 1], [0.6875, 0.6875, 1, 0]])
    close(module(x, **models, only_negative=False), [[0.3125, 0.3125, 0.3125, 1], [0.6875, 0.6875, 1, 0]])
    close(module(x, **models, only_negative=False, eos_token_id=2),
          [[0.3125, 0.3125, 0.3125, 0.3125], [0.6875, 0.6875, 1, 0]])


class FixedLogProbs:
    """An auxiliary model whose response log-probs are given: (B, T) -> token_logprobs over prompt + response."""

    def __init__(self, response_logp: torch.Tensor) -> None:
        self.response_logp = response_logp

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        prompt = torch.zeros(input_ids.shape[0], input_ids.shape[1] - self.response_logp.shape[1],
                             dtype=self.response_logp.dtype)
        return torch.cat([prompt, self.response_logp], 1)


def test_macro_action_terminal_outcome_through_dense_group() -> None:
    """MA-RLHF places the outcome at the end (arXiv 2410.02743; ernie-research/MA-RLHF ``compute_rewards``).

    r = [1, 0], L = 4, n = 2, one group. Macro actions: the n-gram count runs over the tokens before the last one,
    which is a macro action of its own: {0, 1}, {2}, {3}. Terminal placement: R_i sits on token 3, alone in its
    macro action, so the macro rewards are row 0: (0, 0, 1), row 1: (0, 0, 0) -> token rewards [0, 0, 0, 1] and
    [0, 0, 0, 0]. dense_group(scale_by_std=False): returns G = [1, 1, 1, 1] and [0, 0, 0, 0], group mean of the
    totals (1 + 0)/2 = 0.5, so A = [0.5, 0.5, 0.5, 0.5] and [-0.5, -0.5, -0.5, -0.5]: every token gets the outcome.
    The former default (R/L = 0.25 per token, summed per macro action of the plain n-gram split {0, 1}, {2, 3})
    gave row 0 the rewards [0, 0.5, 0, 0.5], hence A = [0.5, 0.5, 0, 0]: no credit for the last macro action.
    """
    from align.advantages import ADVANTAGES

    mask = torch.ones(2, 4, dtype=torch.float64)
    x = CreditInputs(rewards=torch.tensor([1.0, 0.0], dtype=torch.float64), mask=mask,
                     token_ids=torch.zeros(2, 4, dtype=torch.long), group_ids=torch.zeros(2, dtype=torch.long))
    rewards = CREDIT.get("macro_action")(x, n=2)
    close(rewards, [[0, 0, 0, 1], [0, 0, 0, 0]])
    adv = ADVANTAGES.get("dense_group")(rewards, mask, x.group_ids, scale_by_std=False)
    close(adv, [[0.5, 0.5, 0.5, 0.5], [-0.5, -0.5, -0.5, -0.5]])
    # the former placement stays available: R/L = 0.25 per token summed per macro action {0, 1}, {2}, {3}
    spread = CREDIT.get("macro_action")(x, n=2, outcome_placement="uniform", sigma="sum")
    close(spread, [[0, 0.5, 0.25, 0.25], [0, 0, 0, 0]])
    close(ADVANTAGES.get("dense_group")(spread, mask, x.group_ids, scale_by_std=False)[0], [0.5, 0.5, 0, -0.25])


def test_macro_action_sigma_averages_each_macro_action() -> None:
    """Macro reward R_k = sum_{t in omega_k} sigma_t r_t (spec §7; the authors' ``modeling_macro_action``).

    Delimiter 9 and the last-token rule give: row 0 (hole at 2) {0, 1}, {3}; row 1 {0, 1}, {2}; row 2 (position 0
    off the mask, so its 9 is no delimiter) {1}, {2, 3}, {4}. Dense rewards d plus R_i = [1, 0, 2] on the last token:
    sigma "equal" (mean): row 0 (0.1 + 0.2)/2 = 0.15, then 0.4 + 1 = 1.4; row 1 (0.3 - 0.1)/2 = 0.1, then 0.5;
    row 2 -0.2, (0.2 + 0.6)/2 = 0.4, -0.4 + 2 = 1.6. "unit" takes the last token of each macro action, "sum" adds
    them, "position" weights 1 and 1/2 normalised to 2/3, 1/3 (row 2: 0.2 * 2/3 + 0.6 / 3 = 1/3).
    """
    d = torch.tensor([[0.1, 0.2, 5.0, 0.4, 5.0], [0.3, -0.1, 0.5, 5.0, 5.0], [5.0, -0.2, 0.2, 0.6, -0.4]],
                     dtype=torch.float64)  # 5.0 sits off the mask and must be ignored
    macro = CREDIT.get("macro_action")
    x = inputs(token_rewards=d)
    close(macro(x, segmenter="delimiter", delimiter_ids=[9]),
          [[0, 0.15, 0, 1.4, 0], [0, 0.1, 0.5, 0, 0], [0, -0.2, 0, 0.4, 1.6]])
    close(macro(x, segmenter="delimiter", delimiter_ids=[9], sigma="unit"),
          [[0, 0.2, 0, 1.4, 0], [0, -0.1, 0.5, 0, 0], [0, -0.2, 0, 0.6, 1.6]])
    close(macro(x, segmenter="delimiter", delimiter_ids=[9], sigma="sum"),
          [[0, 0.3, 0, 1.4, 0], [0, 0.2, 0.5, 0, 0], [0, -0.2, 0, 0.8, 1.6]])
    close(macro(x, segmenter="delimiter", delimiter_ids=[9], sigma="position"),
          [[0, 0.1 * 2 / 3 + 0.2 / 3, 0, 1.4, 0], [0, 0.3 * 2 / 3 - 0.1 / 3, 0.5, 0, 0], [0, -0.2, 0, 1 / 3, 1.6]])
    returns = discounted_returns(macro(x, n=2), MASK, gamma=1.0)
    assert returns[2, 1] == returns[2, 2]  # same macro action {1, 2}, same reward-to-go
    with pytest.raises(InputError, match="segmenter must be one of"):
        macro(inputs(), segmenter="parse")
    with pytest.raises(InputError, match="sigma must be one of"):
        macro(inputs(), sigma="mean")
    with pytest.raises(InputError, match="outcome_placement must be 'terminal'"):
        macro(inputs(), outcome_placement="last_token")


def test_macro_action_perplexity_cuts_where_the_reference_perplexity_rises() -> None:
    """MA-RLHF's ``ppl_selection``: a macro action starts at token k when ppl_{k+1} > ppl_k, ppl measured under the
    reference model; the last token is its own macro action.

    Row 0, reference p = [0.9, 0.5, 0.6, 0.2, 0.8, 0.3]: perplexity 1/p rises 0->1, 2->3, 4->5, so macro actions
    start at 0, 2, 4: {0, 1}, {2, 3}, {4}, {5}. (The former rule cut after the token before each rise: {0}, {1, 2},
    {3, 4}, {5}.) Dense d = -[0.1 .. 0.6], R = 1, sigma "equal": [0, -0.15, 0, -0.35, -0.5, -0.6 + 1].
    Row 1 (hole at 2, whose p = 0.01 must be skipped): p over trainable tokens [0.5, 0.9, 0.4, 0.3, 0.7] rises at
    k = 1 -> 2 and 2 -> 3, so macro actions start at positions 1 and 3: {0}, {1}, {3, 4}, {5}; R = 0:
    [0.1, 0.2, 0, 0, (0.3 + 0.5)/2, 0.7]. The policy's log-probs (constant) would give no cut at all.
    """
    p = torch.tensor([[0.9, 0.5, 0.6, 0.2, 0.8, 0.3], [0.5, 0.9, 0.01, 0.4, 0.3, 0.7]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]], dtype=torch.float64)
    d = torch.tensor([[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6], [0.1, 0.2, 9.0, 0.3, 0.5, 0.7]], dtype=torch.float64)
    x = CreditInputs(rewards=torch.tensor([1.0, 0.0], dtype=torch.float64), mask=mask,
                     token_ids=torch.ones(2, 6, dtype=torch.long), group_ids=torch.zeros(2, dtype=torch.long),
                     prompt_ids=torch.ones(2, 2, dtype=torch.long), token_rewards=d,
                     logp=torch.full((2, 6), 0.5, dtype=torch.float64).log())
    out = CREDIT.get("macro_action")(x, segmenter="perplexity", ref_model=FixedLogProbs(p.log()))
    close(out, [[0, -0.15, 0, -0.35, -0.5, 0.4], [0.1, 0.2, 0, 0, 0.4, 0.7]])
    with pytest.raises(InputError, match="pass ref_model="):
        CREDIT.get("macro_action")(x, segmenter="perplexity")


def test_gtpo_conflict_weights_need_the_group() -> None:
    out = CREDIT.get("gtpo_conflict")(inputs())
    # rows 0 (+) and 1 (-) share 5, 9 at positions 0, 1; row 0's hole at 2 is skipped; row 2 is alone
    close(out, [[2, 2, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]])


def test_entropy_weighted_keeps_row_totals_or_picks_the_top_tokens() -> None:
    entropy = torch.tensor([[1.0, 3.0, 9.0, 2.0, 9.0], [1, 1, 1, 0, 0], [5, 4, 3, 2, 1]], dtype=torch.float64)
    w = CREDIT.get("entropy_weighted")(inputs(entropy=entropy))
    close(w[0], [0.5, 1.5, 0, 1.0, 0])
    close(w.sum(-1), MASK.sum(-1))
    top = CREDIT.get("entropy_weighted")(inputs(entropy=entropy), top_fraction=0.25)
    close(top, [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    with pytest.raises(InputError, match="needs entropy"):
        CREDIT.get("entropy_weighted")(inputs())


def loop_thr(x: CreditInputs) -> torch.Tensor:
    out = torch.zeros(x.mask.shape, dtype=torch.float64)
    for g in x.group_ids.unique().tolist():
        rows = [i for i in range(len(x.group_ids)) if x.group_ids[i] == g]
        r = [float(x.rewards[i]) for i in rows]
        mean = sum(r) / len(r)
        correct = [i for i in rows if float(x.rewards[i]) > mean]
        if not correct or len(correct) == len(rows):
            continue
        sd = statistics.stdev(r)
        vocab = sorted({int(x.token_ids[i, t]) for i in rows for t in range(x.mask.shape[1]) if x.mask[i, t]})

        def g_vec(i: int, t: int, vocab: list[int] = vocab) -> torch.Tensor:
            probs = torch.softmax(x.logits[i, t].double(), -1)[vocab]
            onehot = torch.tensor([float(v == int(x.token_ids[i, t])) for v in vocab], dtype=torch.float64)
            return onehot - probs

        m_plus = sum(torch.outer(g_vec(j, k), x.hidden[j, k].double()) for j in correct
                     for k in range(x.mask.shape[1]) if x.mask[j, k])
        for i in rows:
            adv = (float(x.rewards[i]) - mean) / (sd + 1e-6)
            for t in range(x.mask.shape[1]):
                if x.mask[i, t]:
                    out[i, t] = adv * float(g_vec(i, t) @ m_plus @ x.hidden[i, t].double())
    return out


def test_thr_reconstruction_matches_a_loop_and_weights_are_bounded() -> None:
    from rewards.credit.thr import token_hidden_rewards

    gen = torch.Generator().manual_seed(5)
    mask = torch.ones(6, 4, dtype=torch.float64)
    mask[1, 3] = 0
    x = CreditInputs(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64), mask=mask,
                     token_ids=torch.randint(0, 6, (6, 4), generator=gen), group_ids=torch.tensor([0, 0, 0, 0, 1, 1]),
                     logits=torch.randn(6, 4, 6, generator=gen), hidden=torch.randn(6, 4, 3, generator=gen))
    torch.testing.assert_close(token_hidden_rewards(x).double(), loop_thr(x), rtol=0, atol=1e-5)
    w = CREDIT.get("thr")(x, p=0.5, tau=0.0)
    assert set(w[mask != 0].unique().tolist()) <= {0.5, 1.0, 1.5}
    close(w[4:], mask[4:])  # an all-correct group keeps weight 1


def test_causal_lm_scorer_serves_a_transformers_model() -> None:
    from align.models import TinyModelConfig, build_tiny_causal_lm

    model = build_tiny_causal_lm(10, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32))
    scorer = CausalLMScorer(model)
    x = inputs(prompt_ids=PROMPT)
    out = CREDIT.get("implicit_dpo")(x, dpo_model=scorer, ref_model=scorer)
    close(out, CREDIT.get("last_token")(x))  # same model twice: no implicit reward, only the outcome
    with torch.no_grad():
        seq = torch.cat([PROMPT, IDS], 1)
        direct = torch.log_softmax(model(input_ids=seq).logits[:, :-1].double(), -1).gather(-1, seq[:, 1:, None])
    torch.testing.assert_close(scorer.token_logprobs(seq, torch.ones_like(seq))[:, 1:].double(),
                               direct.squeeze(-1), rtol=0, atol=1e-5)


def full_inputs() -> tuple[CreditInputs, dict]:
    gen = torch.Generator().manual_seed(9)
    x = inputs(prompt_ids=PROMPT, step_rewards=[[0.2, 0.8], [0.5, -0.5], [1.0, 1.0]],
               logp=-torch.rand(3, 5, generator=gen, dtype=torch.float64),
               entropy=torch.rand(3, 5, generator=gen, dtype=torch.float64),
               token_rewards=0.01 * torch.randn(3, 5, generator=gen, dtype=torch.float64),
               logits=torch.randn(3, 5, 10, generator=gen), hidden=torch.randn(3, 5, 4, generator=gen),
               target_ids=torch.tensor([[1, 2], [3, 0], [4, 4]]), target_mask=torch.tensor([[1, 1], [1, 0], [1, 1]]),
               turn_rewards=[[-0.1, 0.0], [0.3], [0.0, 0.2]], turn_ends=[[1, 3], [2], [2, 4]])  # multi-turn rows
    options = {"implicit_dpo": {"dpo_model": Bigram(1), "ref_model": Bigram(2)},
               "rlp_information_gain": {"policy_model": Bigram(5), "baseline_model": Bigram(6)},
               "contrastive_critical": {"positive_model": Bigram(3), "negative_model": Bigram(4)},
               "contrastive_dpo": {"dpo_model": Bigram(1), "reverse_dpo_model": Bigram(2)},
               "contrastive_prompting": {"ref_model": Bigram(7, vocab=128), "tokenizer": build_char_tokenizer()},
               "prm_steps": {"delimiter_ids": [9]}}
    return x, options


@pytest.mark.parametrize("name", CREDIT.names())
def test_credit_contract(name: str) -> None:
    x, options = full_inputs()
    out = CREDIT.get(name)(x, **options.get(name, {}))
    assert out.shape == MASK.shape
    assert out.dtype == torch.float64
    assert torch.isfinite(out).all()
    assert out[MASK == 0].abs().sum() == 0
    assert not out.requires_grad
    assert CREDIT.info(name)["output"] in ("rewards", "weights")


def test_diagnostics_return_credit_beside_tokens() -> None:
    report = explain(inputs(), {"uniform": {}, "last_token": {}, "discounted": {"gamma": 0.9}})
    records = report.to_records(tokens=[list("abcde"), list("fghij"), list("klmno")])
    assert len(records) == 3
    first = records[0]
    assert first["positions"] == [0, 1, 3] and first["tokens"] == ["a", "b", "d"]
    assert first["credit"]["uniform"] == pytest.approx([1 / 3] * 3)
    assert first["credit"]["last_token"] == [0.0, 0.0, 1.0]
    assert first["output"]["discounted"] == "rewards"
    assert records[2]["tokens"] == ["l", "m", "n", "o"]
