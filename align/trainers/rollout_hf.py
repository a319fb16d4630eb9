"""In-process rollouts with transformers ``generate``: the engine shares the learner's model, so syncing weights
is only a version bump. Rollout log-probs come from the generation logits at the sampling temperature, so the
first update of an on-policy step needs no second forward pass for pi_old."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from align.trainers.precision import Precision, autocast
from align.trainers.protocols import Rollout, SamplingParams, TokenSamples
from align.trainers.sequences import encode, mask_after_eos, pad_left


class HFRolloutEngine:
    shares_module = True  # samples from the learner's own model: a weight sync is a version bump

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 256, precision: Precision = "no") -> None:
        """``precision``: "bf16" samples under the learner's bf16 autocast, so pi_old matches the learner."""
        self.model, self.tokenizer, self.batch_size, self.precision = model, tokenizer, batch_size, precision
        self.weight_version = 0
        self.pad_id = tokenizer.pad_token_id
        self.eos_id = tokenizer.eos_token_id

    def sync_weights(self, model: Any, version: int) -> None:
        self.model = model  # same object in-process: nothing to copy
        self.weight_version = version

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], *, samples_per_prompt: int,
                 params: SamplingParams, seed: int | None = None) -> Rollout:
        """``seed``: sample from a generator seeded with it, leaving the caller's RNG stream untouched (as when the
        engine runs in another process); None: from the global RNG."""
        if seed is None:
            with autocast(self.precision, self.model):
                return self._generate_all(prompts, columns, samples_per_prompt, params)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), autocast(self.precision, self.model):
            torch.manual_seed(seed)
            return self._generate_all(prompts, columns, samples_per_prompt, params)

    @torch.no_grad()
    def generate_tokens(self, prompt_ids: Sequence[Sequence[int]], *, params: SamplingParams,
                        seed: int | None = None) -> TokenSamples:
        """One continuation per row of token ids, token in and token out (:class:`TokenSamples`): each row's
        sampled ids up to and including its first EOS, with their log-probs at the sampling temperature."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None), autocast(self.precision, self.model):
            if seed is not None:
                torch.manual_seed(seed)
            ids, mask = pad_left(prompt_ids, self.pad_id)
            token_ids: list[list[int]] = []
            logp: list[list[float]] = []
            finished: list[bool] = []
            for s in range(0, len(prompt_ids), self.batch_size):
                new, new_logp = self._generate(ids[s : s + self.batch_size], mask[s : s + self.batch_size], params)
                keep = mask_after_eos(new, self.eos_id)
                for row, row_logp, row_keep in zip(new, new_logp, keep, strict=True):
                    n = int(row_keep.sum())
                    token_ids.append(row[:n].tolist())
                    logp.append(row_logp[:n].tolist())
                    finished.append(bool(n) and int(row[n - 1]) == self.eos_id)
        return TokenSamples(token_ids=token_ids, logp=logp, finished=finished, weight_version=self.weight_version)

    def _generate_all(self, prompts: Sequence[str], columns: Mapping[str, Sequence[Any]], samples_per_prompt: int,
                      params: SamplingParams) -> Rollout:
        repeated = [p for p in prompts for _ in range(samples_per_prompt)]
        prompt_ids, prompt_mask = pad_left(encode(self.tokenizer, repeated), self.pad_id)
        chunks = [self._generate(prompt_ids[s : s + self.batch_size], prompt_mask[s : s + self.batch_size], params)
                  for s in range(0, len(repeated), self.batch_size)]
        width = max(c[0].shape[1] for c in chunks)
        ids = torch.cat([torch.nn.functional.pad(c[0], (0, width - c[0].shape[1]), value=self.pad_id)
                         for c in chunks])
        logp = torch.cat([torch.nn.functional.pad(c[1], (0, width - c[1].shape[1])) for c in chunks])
        # the mask comes from EOS alone (per chunk, before padding), never from pad ids: many tokenizers use EOS
        # as their pad token, and the EOS itself is a trained token (spec §0)
        mask = torch.cat([torch.nn.functional.pad(mask_after_eos(c[0], self.eos_id), (0, width - c[0].shape[1]))
                          for c in chunks])
        ids = torch.where(mask != 0, ids, torch.full_like(ids, self.pad_id))
        completions = self.tokenizer.batch_decode([row[m != 0].tolist() for row, m in zip(ids, mask, strict=True)],
                                                  skip_special_tokens=True)
        group_ids = torch.arange(len(prompts)).repeat_interleave(samples_per_prompt)
        cols = {k: [v[i] for i in range(len(prompts)) for _ in range(samples_per_prompt)] for k, v in columns.items()}
        return Rollout(prompts=repeated, completions=completions, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       completion_ids=ids, mask=mask, logp=logp * mask, group_ids=group_ids,
                       weight_version=self.weight_version, columns=cols)

    def _generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                  params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers import GenerationConfig

        was_training = self.model.training
        self.model.eval()
        # A clean config: the model's own generation config (repetition penalties, min_p, ...) would reshape the
        # sampled distribution while the logged log-probs come from the raw logits.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=not params.greedy, pad_token_id=self.pad_id,
            eos_token_id=self.eos_id, return_dict_in_generate=True, output_logits=True,
            **({} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}),
        )
        out = self.model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
        if was_training:
            self.model.train()
        new = out.sequences[:, prompt_ids.shape[1] :]  # (b, t)
        logits = torch.stack(out.logits, 1).float()  # (b, t, V)
        temperature = 1.0 if params.greedy else params.temperature
        logp = torch.log_softmax(logits / temperature, -1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        return new, logp
