"""The bundle's datasheet.md: *Datasheets for Datasets* (Gebru et al., 2021) answered from `ReleaseFacts`.

Seven sections (Motivation, Composition, Collection process, Preprocessing/cleaning/labeling, Uses,
Distribution, Maintenance), each question answered from the facts: the source and its hashes, the model and its
hash, the ε/δ ledger and accountant, the audits, the gate and the approval, saying plainly when approval was
automatic. Rendered with the same escaping environment as the dataset card (user text cannot inject markup).
"""

from __future__ import annotations

from reports.dataset_card import markdown_env, template_context
from reports.facts import ReleaseFacts

SECTIONS = (
    "Motivation",
    "Composition",
    "Collection process",
    "Preprocessing/cleaning/labeling",
    "Uses",
    "Distribution",
    "Maintenance",
)


def render_datasheet(facts: ReleaseFacts) -> str:
    """The datasheet as markdown; one `## <section>` heading per Datasheets section, in order."""
    return markdown_env().get_template("datasheet.md.j2").render(**template_context(facts))
