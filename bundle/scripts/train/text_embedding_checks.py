"""Does a text encoder embed prompts sensibly? Modality separation and smoothness in TR/TE/TI.

Retrieval accuracy (``trainers.RetrievalAccuracy``) says whether texts find their images; these checks look at the
text embedding space alone, so they also apply to a text encoder shipped inside a stage-2 network
(``network.conditioner.text_encoder``):

- modality separation: the nearest other prompt (cosine similarity) of each prompt has the same modality;
- smoothness: sweeping one acquisition time of a prompt over a geometric range (values it never saw in training), the
  embedding of each swept prompt is nearest to the prompts with the adjacent values, and embedding distance grows
  with the difference in log time (Spearman rank correlation).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from scipy.stats import spearmanr

from ..prompt import Prompt, PromptError, tokenize

SWEPT_FIELDS = ("tr", "te", "ti")
# Multiples of a prompt's own time: 9 steps of 2^(1/4) from half to twice the value.
SWEEP_FACTORS = tuple(2.0 ** (k / 4) for k in range(-4, 5))


@torch.no_grad()
def embed_prompts(text_encoder: torch.nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """Unit-norm embeddings ``[N, D]`` of prompt strings (on the CPU), the encoder left in its training mode."""
    device = next(text_encoder.parameters()).device
    was_training = text_encoder.training
    text_encoder.eval()
    try:
        features = text_encoder(tokenize(list(prompts)).to(device))
    finally:
        text_encoder.train(was_training)
    return F.normalize(features.float(), dim=-1).cpu()


def modality_neighbour_accuracy(embeddings: torch.Tensor, modalities: Sequence[str]) -> float:
    """Fraction of prompts whose most similar other prompt has the same modality."""
    if len(modalities) < 2:
        raise ValueError(f"modality separation: expected at least 2 prompts, got {len(modalities)}")
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    nearest = similarity.argmax(dim=1).tolist()
    return float(np.mean([modalities[i] == modalities[j] for i, j in enumerate(nearest)]))


def sweep(prompt: Prompt, field: str, factors: Sequence[float] = SWEEP_FACTORS) -> list[Prompt]:
    """``prompt`` with ``field`` set to each multiple of its own value that is physically valid (TE, TI <= TR)."""
    swept = []
    for factor in factors:
        try:
            swept.append(prompt.replace(**{field: getattr(prompt, field) * factor}))
        except PromptError:
            continue
    return swept


def sweep_smoothness(embeddings: torch.Tensor, values: Sequence[float]) -> tuple[float, float]:
    """(neighbour accuracy, rank correlation) of one sweep's embeddings ``[N, D]`` against their field values.

    Neighbour accuracy: fraction of swept prompts whose most similar other prompt holds an adjacent value (chance for
    an interior one: 2 / (N - 1)). Rank correlation: Spearman's rho between |log value difference| and cosine
    distance from each swept prompt to the others, averaged over the prompts.
    """
    logs = np.log(np.asarray(values, dtype=np.float64))
    order = np.argsort(logs)
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    distance = (1.0 - embeddings @ embeddings.T).double().numpy()
    hits, correlations = [], []
    for i in range(len(logs)):
        others = np.delete(np.arange(len(logs)), i)
        nearest = others[np.argmin(distance[i, others])]
        hits.append(abs(int(position[nearest]) - int(position[i])) == 1)
        rho = spearmanr(np.abs(logs[others] - logs[i]), distance[i, others]).statistic
        correlations.append(0.0 if np.isnan(rho) else rho)
    return float(np.mean(hits)), float(np.mean(correlations))


def text_embedding_report(text_encoder: torch.nn.Module, prompts: Sequence[str], max_sweeps: int = 4) -> dict:
    """Modality separation over ``prompts`` and, per time in ``SWEPT_FIELDS``, the smoothness of sweeps around up to
    ``max_sweeps`` distinct prompts that state it: ``{"modality_neighbours", "<field>_neighbours",
    "<field>_rank_correlation"}`` (fields no prompt states are left out)."""
    parsed = [Prompt.parse(p) for p in prompts]
    report = {"modality_neighbours": modality_neighbour_accuracy(embed_prompts(text_encoder, prompts),
                                                                 [p.modality for p in parsed])}
    for field in SWEPT_FIELDS:
        bases = list(dict.fromkeys(p for p in parsed if getattr(p, field)))[:max_sweeps]
        sweeps = [swept for swept in (sweep(base, field) for base in bases) if len(swept) >= 3]
        if not sweeps:
            continue
        scores = [sweep_smoothness(embed_prompts(text_encoder, [p.render() for p in swept]),
                                   [getattr(p, field) for p in swept]) for swept in sweeps]
        report[f"{field}_neighbours"] = float(np.mean([s[0] for s in scores]))
        report[f"{field}_rank_correlation"] = float(np.mean([s[1] for s in scores]))
    return report


class TextEmbeddingCheck:
    """Evaluator handler: after each validation run, ``text_embedding_report`` of the network's text tower on the
    validation prompts, added to ``engine.state.metrics`` as ``<prefix><name>`` (so Stats/TensorBoard handlers
    attached after it log them)."""

    def __init__(self, prompts: Sequence[str], prefix: str = "val_text_", max_sweeps: int = 4):
        self.prompts = list(dict.fromkeys(prompts))
        self.prefix, self.max_sweeps = prefix, int(max_sweeps)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        model = getattr(engine.network, "module", engine.network)  # a DDP-wrapped BMLIP
        report = text_embedding_report(model.text_encoder, self.prompts, self.max_sweeps)
        engine.state.metrics.update({self.prefix + name: value for name, value in report.items()})
