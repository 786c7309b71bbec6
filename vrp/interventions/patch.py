"""``patch``: activation patching from a rightly answered donor into a wrongly answered recipient.

What this module offers:

* :func:`counterfactual_pairs` / :func:`random_pairs` / :func:`read_pairs` - who donates to whom
  (pure and seeded, or from a CSV file); :func:`skip_unequal_images` drops pairs whose image-token
  counts differ when image positions are patched.
* :func:`plan_patch` -> :class:`Patch`: reads the base run's answers and checks every prerequisite.

Usage::

    plan = plan_patch(lake, base_run_id, site="resid", layers="all", positions="answer")
    run_intervention(plan, lake_root)

Per batch of recipients, the donors are run once (one prefill, the site's output recorded at every
chosen layer), then the recipients are answered unpatched (``full``) and once per layer with each
row's own donor vectors written at the chosen positions: ``answer`` (the last prompt token),
``image`` (every image token, in grid order: donor and recipient need the same count) or ``all``
(every real prompt position, aligned at the answer position: they need the same prompt length).

Rows: ``full`` (level 0) and ``patch`` (level = the layer), each with ``donor_sample_id``; the
patched rows' ``setting`` names the site and layer, and ``restoration`` is the share of the gap
between the recipient's and the donor's first-token truth margins that the patch closes:
``(m_patched - m_recipient) / (m_donor - m_recipient)`` (1 = the donor's margin restored; null when
the two margins are equal). Each truth margin is taken against its own sample's label.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vrp.ingest.datasets import Sample
from vrp.ingest.models.base import Adapter, Encoded
from vrp.interventions.base import (
    Condition,
    Intervention,
    InterventionError,
    base_run,
    base_samples,
    num_layers_of,
    parse_layer_spec,
)
from vrp.interventions.hooks import PatchRows, RecordOutputs, RowEdit
from vrp.interventions.scoring import first_token_scores
from vrp.lake import Lake

SITES = ("resid", "attn_out", "mlp_out")
POSITIONS = ("answer", "image", "all")
PAIRINGS = ("counterfactual", "random")

Pair = tuple[str, str]  # (recipient sample id, donor sample id)


def site_module(adapter: Adapter, site: str, layer: int) -> torch.nn.Module:
    """The module whose output is the site: the decoder layer (resid), what its attention or MLP adds."""
    if site == "resid":
        return adapter.decoder_layers()[layer]
    if site == "attn_out":
        return adapter.attn_out(layer)
    if site == "mlp_out":
        return adapter.mlp_out(layer)
    raise InterventionError(f"--site must be one of {', '.join(SITES)}, got {site!r}")


def counterfactual_pairs(samples: Sequence[dict[str, Any]], seed: int) -> tuple[list[Pair], int]:
    """Each wrongly answered sample gets a rightly answered donor with the same dataset, split and label.

    Among those, a donor showing the same image is preferred, then one asking about the same
    object, then any; the choice within the first non-empty group is drawn with ``seed`` (in
    recipient id order, so the same seed gives the same pairs). Returns (pairs, recipients
    without any donor).
    """
    rng = np.random.default_rng(seed)
    right = sorted((s for s in samples if s["correct"] is True), key=lambda s: s["sample_id"])
    pairs, lonely = [], 0
    for recipient in sorted((s for s in samples if s["correct"] is False), key=lambda s: s["sample_id"]):
        same = [
            d
            for d in right
            if (d["dataset"], d["split"], d["label"])
            == (recipient["dataset"], recipient["split"], recipient["label"])
        ]
        tiers = (
            [d for d in same if d["image_id"] == recipient["image_id"]],
            [d for d in same if d["object"] == recipient["object"]],
            same,
        )
        group = next((tier for tier in tiers if tier), None)
        if group is None:
            lonely += 1
            continue
        pairs.append((recipient["sample_id"], group[int(rng.integers(len(group)))]["sample_id"]))
    return pairs, lonely


def random_pairs(samples: Sequence[dict[str, Any]], seed: int) -> tuple[list[Pair], int]:
    """Each wrongly answered sample gets a donor drawn with ``seed`` among all rightly answered ones."""
    rng = np.random.default_rng(seed)
    right = sorted(s["sample_id"] for s in samples if s["correct"] is True)
    wrong = sorted(s["sample_id"] for s in samples if s["correct"] is False)
    if not right:
        return [], len(wrong)
    return [(r, right[int(rng.integers(len(right)))]) for r in wrong], 0


def read_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a CSV file with the header ``recipient_sample_id,donor_sample_id``."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            needed = {"recipient_sample_id", "donor_sample_id"}
            if not needed <= set(reader.fieldnames or ()):
                raise InterventionError(
                    f"{path}: the pairs file needs the header recipient_sample_id,donor_sample_id"
                )
            return [(row["recipient_sample_id"].strip(), row["donor_sample_id"].strip()) for row in reader]
    except OSError as exc:
        raise InterventionError(f"cannot read the pairs file {path}: {exc.strerror or exc}") from exc


def skip_unequal_images(pairs: Sequence[Pair], tokens: dict[str, int]) -> tuple[list[Pair], int]:
    """Keep the pairs whose donor and recipient have the same image-token count; count the others."""
    kept = [p for p in pairs if tokens[p[0]] == tokens[p[1]]]
    return kept, len(pairs) - len(kept)


@dataclass(frozen=True)
class _PatchBatch:
    edits: dict[int, list[RowEdit]]  # layer -> per-row edits
    donor_margin: list[float | None]  # None where the donor has no right answer to score against
    donors: list[str]
    patched: list[bool]  # per row: False when the prompt lengths differ (positions "all")


@dataclass
class Patch(Intervention):
    """Activation patching at one site over a set of layers, donor -> recipient per row."""

    kind = "patch"
    site: str = "resid"
    layers: tuple[int, ...] = ()
    positions: str = "answer"
    pairing: str = "counterfactual"  # counterfactual, random or file:<name>
    pairs: tuple[Pair, ...] = ()
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> pairs left out
    _donor_samples: dict[str, Sample] = field(default_factory=dict)

    def select(self, samples: Sequence[Sample]) -> list[Sample]:
        by_id = {s.sample_id: s for s in samples}
        self._donor_samples = {d: by_id[d] for _r, d in self.pairs}
        return [by_id[r] for r, _d in self.pairs]

    def notes(self) -> list[str]:
        notes = [f"{len(self.pairs)} recipient-donor pairs ({self.positions} positions)"]
        notes += [f"{n} pairs skipped: {reason}" for reason, n in sorted(self.skipped.items()) if n]
        return notes

    def conditions(self) -> Sequence[Condition]:
        return [Condition("full", 0.0)] + [Condition("patch", float(layer), layer) for layer in self.layers]

    def _positions(self, enc: Encoded, row: int) -> torch.Tensor:
        if self.positions == "answer":
            return enc.answer_pos[row : row + 1].cpu()
        if self.positions == "image":
            return enc.image_pos[row].cpu()
        length = int(enc.inputs["attention_mask"][row].sum())
        end = int(enc.answer_pos[row]) + 1
        return torch.arange(end - length, end)

    def prepare(self, adapter: Adapter, enc: Encoded, batch: Sequence[Sample]) -> _PatchBatch:
        """Run the donors once, recording the site at every layer, and map their vectors to each row."""
        donor_of = dict(self.pairs)
        donors = [self._donor_samples[donor_of[s.sample_id]] for s in batch]
        denc, images, questions = self.encode(adapter, donors)
        prompt_len = int(denc.inputs["input_ids"].shape[1])
        modules = {layer: site_module(adapter, self.site, layer) for layer in self.layers}
        with torch.no_grad(), RecordOutputs(modules, prompt_len) as record:
            out = adapter.model.generate(
                **denc.inputs,
                do_sample=False,
                max_new_tokens=1,
                return_dict_in_generate=True,
                output_logits=True,
                pad_token_id=adapter.tokenizer.pad_token_id,
            )
        scores = first_token_scores(adapter, out.logits[0], donors, self.task, images, questions)
        edits: dict[int, list[RowEdit]] = {layer: [] for layer in self.layers}
        patched = []
        for row in range(len(batch)):
            mine, theirs = self._positions(enc, row), self._positions(denc, row)
            ok = mine.numel() == theirs.numel()
            if not ok and self.positions == "image":
                raise InterventionError(
                    f"recipient {batch[row].sample_id} has {mine.numel()} image tokens but donor "
                    f"{donors[row].sample_id} has {theirs.numel()}; "
                    "the lake's counts disagree with the processor"
                )
            patched.append(ok)
            if not ok:  # counted for the summary: these recipients keep only their `full` row
                reason = "donor and recipient prompts differ in length (positions all)"
                self.skipped[reason] = self.skipped.get(reason, 0) + 1
            if ok:
                for layer in self.layers:
                    edits[layer].append(
                        RowEdit(row, mine, record.values[layer][row, theirs.to(out.sequences.device)])
                    )
        return _PatchBatch(
            edits=edits,
            donor_margin=[row["truth_margin"] for row in scores],
            donors=[d.sample_id for d in donors],
            patched=patched,
        )

    @contextlib.contextmanager
    def apply(
        self, adapter: Adapter, enc: Encoded, condition: Condition, state: _PatchBatch
    ) -> Iterator[dict[str, torch.Tensor]]:
        if condition.name == "full":
            yield enc.inputs
            return
        layer = int(condition.payload)
        prompt_len = int(enc.inputs["input_ids"].shape[1])
        with PatchRows(site_module(adapter, self.site, layer), state.edits[layer], prompt_len):
            yield enc.inputs

    def rows(
        self,
        condition: Condition,
        batch: Sequence[Sample],
        answers: Sequence[dict[str, Any]],
        state: _PatchBatch,
        reference: Sequence[dict[str, Any]] | None,
    ) -> list[dict[str, Any]]:
        out = []
        for row, (sample, answer) in enumerate(zip(batch, answers, strict=True)):
            if condition.name == "full":
                setting, restoration = self.setting, None
            elif not state.patched[row]:
                continue  # prompt lengths differ: nothing was patched in this row
            else:
                setting = (
                    f"site={self.site},layer={condition.payload},positions={self.positions},"
                    f"pairs={self.pairing},seed={self.seed}"
                )
                restoration = restoration_share(
                    answer["truth_margin"], reference[row]["truth_margin"], state.donor_margin[row]
                )
            out.append(
                {
                    "sample_id": sample.sample_id,
                    "kind": self.kind,
                    "setting": setting,
                    "condition": condition.name,
                    "level": condition.level,
                    "donor_sample_id": state.donors[row],
                    "detail": json.dumps(
                        {"donor_truth_margin": state.donor_margin[row], "patched": state.patched[row]}
                    ),
                    "seed": self.seed,
                    "restoration": restoration,
                    **answer,
                }
            )
        return out


def restoration_share(patched: float | None, recipient: float | None, donor: float | None) -> float | None:
    """Share of the recipient -> donor truth-margin gap the patch closes; None when there is no gap.

    None too when a margin is unknown (a sample without a right answer has no truth token).
    """
    if patched is None or recipient is None or donor is None:
        return None
    gap = donor - recipient
    if abs(gap) < 1e-6:
        return None
    return (patched - recipient) / gap


def plan_patch(
    lake: Lake,
    base_run_id: str,
    *,
    site: str = "resid",
    layers: str | Sequence[int] = "all",
    positions: str = "answer",
    pairs: str = "counterfactual",
    seed: int = 0,
) -> Patch:
    """Check and read what patching needs: the base run's answers, the pairs, the layers.

    ``pairs``: ``counterfactual``, ``random`` or the path of a CSV file of explicit pairs.
    """
    if site not in SITES:
        raise InterventionError(f"--site must be one of {', '.join(SITES)}, got {site!r}")
    if positions not in POSITIONS:
        raise InterventionError(f"--positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    base = base_run(lake, base_run_id)
    n_layers = num_layers_of(lake, base_run_id)
    spec = layers if isinstance(layers, str) else ",".join(str(int(layer)) for layer in layers)
    chosen = sorted({layer for window in parse_layer_spec(spec, n_layers) for layer in window})
    rows = base_samples(
        lake,
        base_run_id,
        ["dataset", "split", "image_id", "object", "label", "correct", "n_image_tokens"],
    )
    known = {r["sample_id"]: r for r in rows}
    skipped: dict[str, int] = {}
    if pairs == "counterfactual":
        chosen_pairs, skipped["no rightly answered donor with the same dataset, split and label"] = (
            counterfactual_pairs(rows, seed)
        )
        name = pairs
    elif pairs == "random":
        chosen_pairs, skipped["no rightly answered donor"] = random_pairs(rows, seed)
        name = pairs
    else:
        chosen_pairs = read_pairs(pairs)
        unknown = sorted({s for pair in chosen_pairs for s in pair if s not in known})
        if unknown:
            raise InterventionError(
                f"{len(unknown)} sample ids of {pairs} are not samples of run {base_run_id} "
                f"(first: {unknown[0]}); list them with "
                f"`vrp query \"select sample_id, correct from samples where run_id = '{base_run_id}'\"`"
            )
        recipients = [r for r, _d in chosen_pairs]
        if len(set(recipients)) != len(recipients):
            raise InterventionError(f"{pairs}: a recipient appears twice; give each recipient one donor")
        name = f"file:{Path(pairs).name}"
    if positions in ("image", "all"):
        tokens = {sid: int(r["n_image_tokens"] or 0) for sid, r in known.items()}
        chosen_pairs, skipped["donor and recipient have different image-token counts"] = skip_unequal_images(
            chosen_pairs, tokens
        )
    if not chosen_pairs:
        raise InterventionError(
            f"run {base_run_id} gives no recipient-donor pairs ({pairs}, {positions} positions): "
            "patching needs wrongly and rightly answered samples; try --pairs random or a pairs file"
        )
    return Patch(
        base=base,
        setting=f"site={site},layers={spec},positions={positions},pairs={name},seed={seed}",
        seed=seed,
        params={
            "site": site,
            "layers": chosen,
            "positions": positions,
            "pairs": [list(p) for p in chosen_pairs],
        },
        site=site,
        layers=tuple(chosen),
        positions=positions,
        pairing=name,
        pairs=tuple(chosen_pairs),
        skipped=skipped,
    )
