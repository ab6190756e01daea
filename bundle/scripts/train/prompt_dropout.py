"""Prompt-field dropout for training: real users often do not know TR/TE/TI/FA, age, sex or the scanner.

Training with some prompt fields replaced by ``None`` teaches the text-conditioned networks what a prompt with unknown
values means: a typical image of the requested modality. The modality is never dropped (it is the task itself).
``RandSourceDropoutd`` likewise hides the input's own contrast, which some inputs' metadata do not give.
"""

from __future__ import annotations

import torch
from monai.transforms import MapTransform, Randomizable

from ..nets.tumsyn_net import UNKNOWN_SOURCE
from ..prompt import Prompt, tokenize

# Prompt fields a user may not know, as groups dropped together: the scanner is one template field (strength, vendor).
DROPPABLE_FIELDS = (("age",), ("sex",), ("field_strength", "manufacturer"), ("voxel_size",), ("tr",), ("te",), ("ti",),
                    ("fa",))
# The acquisition timing, which a scan's metadata give all together or not at all: a NIfTI converted without its JSON
# sidecar, or a prompt that names only the contrast, still has the voxel size of its header.
SEQUENCE_FIELDS = (("tr",), ("te",), ("ti",), ("fa",))


class RandPromptDropoutd(Randomizable, MapTransform):
    """Replace prompt fields of ``data[prompt_key]`` by ``None`` and re-tokenize it into ``data[tokens_key]``.

    With probability ``all_fields_prob`` every droppable field is dropped at once (the prompt of a scan whose
    acquisition is entirely unknown); otherwise each field of ``DROPPABLE_FIELDS`` is dropped independently with
    probability ``field_prob``, and with probability ``sequence_prob`` the imaging parameters (``SEQUENCE_FIELDS``)
    are dropped together as well. Independent draws alone almost never leave a prompt without its four parameters,
    the prompt real metadata most often give. A list of prompts (several targets of one sample) is dropped prompt by
    prompt.
    """

    def __init__(self, prompt_key: str = "prompt", tokens_key: str = "tokens", field_prob: float = 0.2,
                 all_fields_prob: float = 0.05, sequence_prob: float = 0.0):
        for name, value in (("field_prob", field_prob), ("all_fields_prob", all_fields_prob),
                            ("sequence_prob", sequence_prob)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"prompt dropout {name}: expected a probability in [0, 1], got {value!r}")
        MapTransform.__init__(self, prompt_key)
        self.prompt_key, self.tokens_key = prompt_key, tokens_key
        self.field_prob, self.all_fields_prob = float(field_prob), float(all_fields_prob)
        self.sequence_prob = float(sequence_prob)
        self._dropped: list[tuple[str, ...]] = []

    def randomize(self, data=None) -> None:
        if self.R.rand() < self.all_fields_prob:
            self._dropped = list(DROPPABLE_FIELDS)
            return
        # 0 draws nothing more than before the option, so existing seeds keep their stream
        sequence = self.sequence_prob > 0 and self.R.rand() < self.sequence_prob
        self._dropped = [group for group in DROPPABLE_FIELDS
                         if (sequence and group in SEQUENCE_FIELDS) or self.R.rand() < self.field_prob]

    def _drop(self, prompt: str) -> str:
        self.randomize()
        if not self._dropped:
            return prompt
        return Prompt.parse(prompt).replace(**{field: None for group in self._dropped for field in group}).render()

    def __call__(self, data: dict) -> dict:
        single = isinstance(data[self.prompt_key], str)
        prompts = [data[self.prompt_key]] if single else list(data[self.prompt_key])
        dropped = [self._drop(prompt) for prompt in prompts]
        if dropped == prompts:
            return data
        tokens = tokenize(dropped)
        out = dict(data)
        out[self.prompt_key], out[self.tokens_key] = (dropped[0], tokens[0]) if single else (dropped, tokens)
        return out


class RandSourceDropoutd(Randomizable, MapTransform):
    """With probability ``prob``, ``data[key]`` (the input's modality index) becomes ``UNKNOWN_SOURCE``."""

    def __init__(self, key: str = "input_modality", prob: float = 0.2):
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"source dropout prob: expected a probability in [0, 1], got {prob!r}")
        MapTransform.__init__(self, key)
        self.key, self.prob = key, float(prob)

    def __call__(self, data: dict) -> dict:
        if self.R.rand() >= self.prob:
            return data
        value = data[self.key]  # of the same type as the other samples' (a tensor or a number), so they collate
        if isinstance(value, torch.Tensor):
            return {**data, self.key: torch.full_like(value, UNKNOWN_SOURCE)}
        return {**data, self.key: type(value)(UNKNOWN_SOURCE)}
