"""Patterns and verbalizers: NLI examples as prompts, labels as single next tokens.

A pattern renders ``(premise, hypothesis)`` as text; its verbalizer maps each label to the word
that follows that text. Patterns are data: the built-in ones are in
``mend/baselines/nli/patterns.yaml``, and a user's YAML file (``patterns_file``) adds more without
code.

**Leading spaces.** A verbalizer word carries its own leading space (``" Yes"``). Its token is
found *in context*: the ids of ``prompt + word`` minus the ids of ``prompt``. That is exactly
the token the model would read next, for GPT-2-style byte-level BPE (``Ġ``-prefixed tokens) and
for SentencePiece (``▁``-prefixed) alike. A word that is not one token after the pattern is an
error that names what it became.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mend.baselines.nli.data import LABELS, NLIExample
from mend.errors import ConfigError

BUILTIN = Path(__file__).with_name("patterns.yaml")


@dataclass(frozen=True)
class Pattern:
    name: str
    template: str
    verbalizer: dict[str, str]

    def __post_init__(self) -> None:
        if set(self.verbalizer) != set(LABELS):
            raise ConfigError(f"Pattern {self.name}: the verbalizer must map exactly "
                              f"{', '.join(LABELS)}; it maps {', '.join(self.verbalizer)}.")
        for field in ("{premise}", "{hypothesis}"):
            if field not in self.template:
                raise ConfigError(f"Pattern {self.name}: the template needs {field}.")

    def render(self, ex: NLIExample) -> str:
        return self.template.replace("{premise}", ex.premise).replace("{hypothesis}",
                                                                        ex.hypothesis)

    def demonstration(self, ex: NLIExample) -> str:
        """The example rendered and answered: a demonstration for in-context learning."""
        return self.render(ex) + self.verbalizer[ex.label]

    def label_ids(self, tokenizer) -> list[int]:
        """The token id of each label's word right after the pattern, in ``LABELS`` order."""
        probe = self.render(NLIExample("A man is sleeping.", "A person rests", LABELS[0]))
        base = tokenizer(probe, add_special_tokens=False)["input_ids"]
        ids = []
        for label in LABELS:
            word = self.verbalizer[label]
            full = tokenizer(probe + word, add_special_tokens=False)["input_ids"]
            if full[:len(base)] != base or len(full) != len(base) + 1:
                pieces = tokenizer.convert_ids_to_tokens(full[len(base) - 1:])
                raise ConfigError(
                    f"Pattern {self.name}: the verbalizer {word!r} is not one token after the "
                    f"pattern for this tokenizer (the prompt's end becomes {pieces}). Choose a "
                    f"word that is a single token here.")
            ids.append(full[-1])
        if len(set(ids)) != len(ids):
            raise ConfigError(f"Pattern {self.name}: two labels map to the same token.")
        return ids


def load_patterns(path: str | Path | None = None) -> dict[str, Pattern]:
    """The built-in patterns, updated by those of ``path``."""
    specs = yaml.safe_load(BUILTIN.read_text())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Patterns file {path} does not exist.")
        specs.update(yaml.safe_load(path.read_text()) or {})
    patterns = {}
    for name, spec in specs.items():
        if not isinstance(spec, dict) or set(spec) != {"template", "verbalizer"}:
            raise ConfigError(f"Pattern {name} needs exactly `template` and `verbalizer`.")
        patterns[name] = Pattern(name, spec["template"], dict(spec["verbalizer"]))
    return patterns


def get_pattern(name: str, path: str | Path | None = None) -> Pattern:
    patterns = load_patterns(path)
    if name not in patterns:
        raise ConfigError(f"Unknown pattern {name!r}; known: {', '.join(patterns)}.")
    return patterns[name]


def context_text(pattern: Pattern, demos: Sequence[NLIExample], sep: str = "\n\n",
                 instruction: str | None = None) -> str:
    """Demonstrations (and an optional instruction first) as one context string."""
    parts = ([instruction] if instruction else []) + [pattern.demonstration(d) for d in demos]
    return sep.join(parts)
