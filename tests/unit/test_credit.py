"""Credit-assignment modules on hand-built inputs (masks with holes), sums they promise, and a contract."""

from __future__ import annotations

import statistics

import pytest
import torch

from align.errors import InputError
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


def test_macro_action_segments_share_credit() -> None:
    ngram = CREDIT.get("macro_action")(inputs(), segmenter="ngram", n=2)
    close(ngram[0], [0, 2 / 3, 0, 1 / 3, 0])
    close(ngram[2], [0, 0, 1.0, 0, 1.0])
    close(ngram.sum(-1), REWARDS)
    delim = CREDIT.get("macro_action")(inputs(), segmenter="delimiter", delimiter_ids=[9], base="last_token")
    close(delim[0], [0, 0, 0, 1, 0])  # the only reward sits in the last segment
    logp = torch.log(torch.tensor([[0.9, 0.5, 0.5, 0.1, 1.0], [0.5, 0.6, 0.7, 1, 1], [1, 0.9, 0.3, 0.8, 0.2]],
                                  dtype=torch.float64))
    ppl = CREDIT.get("macro_action")(inputs(logp=logp), segmenter="perplexity")
    # row 0: surprisal rises 0 -> 1 and 1 -> 3, so every token ends a segment; row 1 never rises: one segment
    close(ppl[0], [1 / 3, 1 / 3, 0, 1 / 3, 0])
    close(ppl[1], [0, 0, 0, 0, 0])
    returns = discounted_returns(ngram, MASK, gamma=1.0)
    assert returns[0, 0] == returns[0, 1]  # same segment, same reward-to-go
    with pytest.raises(InputError, match="segmenter must be one of"):
        CREDIT.get("macro_action")(inputs(), segmenter="parse")


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
               logits=torch.randn(3, 5, 10, generator=gen), hidden=torch.randn(3, 5, 4, generator=gen))
    options = {"implicit_dpo": {"dpo_model": Bigram(1), "ref_model": Bigram(2)},
               "contrastive_critical": {"positive_model": Bigram(3), "negative_model": Bigram(4)},
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
