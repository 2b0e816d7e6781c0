"""The bundle's README.md: a Hugging Face dataset card rendered from `ReleaseFacts`.

The YAML header is written with `yaml.safe_dump` (never templated by hand) and declares the `configs`
(data_files under data/train) and the `features` with `label` as a `class_label` whose names are in label order,
so `datasets.load_dataset(BUNDLE)` yields a ClassLabel. The body is a jinja2 template. Markdown has no
autoescape, so every value printed by a template goes through `md_escape` (the environment's `finalize`):
HTML-special characters become entities and markdown syntax characters are backslash-escaped, and line breaks
are folded, so a reviewer comment cannot inject HTML, links, images or headings. Templates opt out only for
values built here as `Markup` (code literals, quoted blocks).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import yaml
from markupsafe import Markup

from reports.bundle_layout import METADATA_CSV, SPLIT, SPLIT_DIR, class_folder_names, image_file_name
from reports.facts import Estimate, ReleaseFacts

TEMPLATES = Path(__file__).with_name("templates")

# --- markdown escaping ------------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
# Block syntax a value could open when printed at the start of a line: list item, ATX heading, setext underline.
_LEADING_BLOCK = re.compile(r"^(\s*)(?:[-+]|\d{1,9}[.)]|#{1,6})(?:\s|$)|^(\s*)[=-]+\s*$")


def md_escape(value: Any) -> str:
    """One line of markdown-inert text: no HTML tags, links, images, emphasis, headings or list starts."""
    text = _CONTROL.sub("", _LINE_BREAKS.sub(" ", str(value)))
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    # A value printed at the start of a line must not open a list, a setext heading or a rule.
    m = _LEADING_BLOCK.match(text)
    if m:
        indent = len(m.group(1) or m.group(2) or "")
        body = text[indent:]
        ordered = re.match(r"\d{1,9}(?=[.)])", body)
        # CommonMark escapes punctuation only: '1\. x', '\- x', '\# x'.
        k = ordered.end() if ordered else 0
        text = text[:indent] + body[:k] + "\\" + body[k:]
    return text


def md_quote(value: Any, empty: str = "(no comment)") -> Markup:
    """A multi-line user text as a markdown block quote, each line escaped."""
    lines = [md_escape(line) for line in str(value or "").splitlines() if line.strip()]
    return Markup("\n".join(f"> {line}" for line in (lines or [md_escape(empty)])))


def code_literal(value: Any) -> Markup:
    """A JSON/Python string literal safe inside a fenced code block (backticks escaped as \\u0060)."""
    return Markup(json.dumps(str(value)).replace("`", "\\u0060"))


def code_text(value: Any) -> Markup:
    """Text inside a code span or fenced block: one line, no backticks (so it cannot close the code)."""
    return Markup(_CONTROL.sub("", _LINE_BREAKS.sub(" ", str(value))).replace("`", "'"))


def bibtex_text(value: Any) -> Markup:
    """Text inside a BibTeX braced field: one line, no braces, backslashes, '@', angle brackets or backticks."""
    return Markup(re.sub(r"[{}\\@`<>]", "", str(code_text(value))))


def _finalize(value: Any) -> Any:
    if isinstance(value, Markup):
        return value
    if value is None:
        return "n/a"
    return md_escape(value)


# Number formatters return Markup: their output is digits and punctuation we wrote, not user text.


def fmt_num(x: float | None, digits: int = 3) -> Markup:
    return Markup("n/a" if x is None else f"{float(x):.{digits}f}")


def fmt_sci(x: float | None) -> Markup:
    return Markup("n/a" if x is None else f"{float(x):.1e}")


def fmt_pct(x: float | None) -> Markup:
    return Markup("n/a" if x is None else f"{100 * float(x):.2f}%")


def fmt_estimate(e: Estimate | None) -> Markup:
    if e is None:
        return Markup("n/a")
    if e.ci_low is None or e.ci_high is None:
        return Markup(f"{e.value:.3f}")
    level = f"{e.ci_level:.0%} CI " if e.ci_level else "CI "
    return Markup(f"{e.value:.3f} ({level}{e.ci_low:.3f}–{e.ci_high:.3f})")


@functools.cache
def markdown_env():  # -> jinja2.Environment
    """The jinja2 environment for markdown documents: every printed value is md-escaped unless Markup."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=False,  # markdown, not HTML: escaping is done by _finalize
        finalize=_finalize,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        num=fmt_num, sci=fmt_sci, pct=fmt_pct, est=fmt_estimate,
        quote=md_quote, code=code_literal, ct=code_text, bib=bibtex_text,
    )
    return env


# --- licenses ---------------------------------------------------------------------------------------------

# Normalised license text -> (Hugging Face license id, canonical URL)
_LICENSES = {
    "cc-by-4.0": ("cc-by-4.0", "https://creativecommons.org/licenses/by/4.0/"),
    "cc-by-sa-4.0": ("cc-by-sa-4.0", "https://creativecommons.org/licenses/by-sa/4.0/"),
    "cc-by-nc-4.0": ("cc-by-nc-4.0", "https://creativecommons.org/licenses/by-nc/4.0/"),
    "cc-by-nc-sa-4.0": ("cc-by-nc-sa-4.0", "https://creativecommons.org/licenses/by-nc-sa/4.0/"),
    "cc0-1.0": ("cc0-1.0", "https://creativecommons.org/publicdomain/zero/1.0/"),
    "apache-2.0": ("apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0"),
    "mit": ("mit", "https://opensource.org/license/mit"),
}


def _norm_license(text: str) -> str:
    t = re.sub(r"[\s_]+", "-", text.strip().lower())
    return {"cc-by": "cc-by-4.0", "cc0": "cc0-1.0"}.get(t, t)


def hf_license(text: str) -> str:
    """The Hugging Face `license:` id of a license text ('CC BY 4.0' -> 'cc-by-4.0'); 'unknown' / 'other'."""
    t = _norm_license(text or "unknown")
    if t in ("", "unknown", "none"):
        return "unknown"
    return _LICENSES[t][0] if t in _LICENSES else "other"


def license_url(text: str) -> str | None:
    """The canonical URL of a known license, else None."""
    t = _norm_license(text or "")
    return _LICENSES[t][1] if t in _LICENSES else None


def size_category(n: int) -> str:
    """Hugging Face `size_categories` bucket of `n` examples."""
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return label
    return "1M<n<10M"


# --- shared phrases ---------------------------------------------------------------------------------------


def image_description(facts: ReleaseFacts) -> str:
    im = facts.synthetic.image
    kind = "grayscale" if im.channels == 1 else ("RGB" if im.channels == 3 else f"{im.channels}-channel")
    return f"{im.height}×{im.width} {kind} PNG"


def privacy_statement(facts: ReleaseFacts) -> str:
    """One plain-text sentence stating the privacy guarantee (or its absence)."""
    p = facts.privacy
    if not p.dp:
        return (
            "The generator was not differentially private: it was trained without DP-SGD, so no formal privacy "
            "guarantee bounds what the synthetic images can reveal about the training images; only the empirical "
            "audits below speak to memorisation."
        )
    parts = [
        f"The generator was trained with differential privacy (DP-SGD): ε = {p.epsilon:.2f}, δ = {p.delta:.1e}",
        f"({p.accountant} accountant",
    ]
    extra = []
    if p.noise_multiplier is not None:
        extra.append(f"noise multiplier σ = {p.noise_multiplier:.3g}")
    if p.sample_rate is not None:
        extra.append(f"sample rate q = {p.sample_rate:.3g}")
    if p.steps is not None:
        extra.append(f"{p.steps} steps")
    if p.noise_multiplicity:
        extra.append(f"noise multiplicity K = {p.noise_multiplicity}")
    tail = (", " + ", ".join(extra)) if extra else ""
    unit = f" Privacy unit: {p.privacy_unit}." if p.privacy_unit else ""
    return (f"{parts[0]} {parts[1]}{tail}).{unit} Any analysis of the synthetic images inherits this guarantee."
            + _autoencoder(p.autoencoder) + _public_pretraining(p.public_pretraining))


def _autoencoder(ae: dict | None) -> str:
    """What the guarantee says about a latent generator's autoencoder (DP-trained at a share of ε, or public)."""
    if not ae:
        return ""
    if ae.get("trained_with") == "dp":
        return (f" The latent generator's autoencoder was trained with DP-SGD on the same private images, with "
                f"{float(ae.get('share', 0)):.0%} of the target ε (ε = {float(ae.get('epsilon_alone', 0)):.2f} on "
                "its own); ε above composes it with the UNet's training, so the guarantee covers both parts.")
    return (f" The latent generator's autoencoder was not trained on the private images: it is the frozen "
            f"autoencoder of a public model (content hash {str(ae.get('model'))[:16]}…), which the guarantee does "
            "not cover.")


def _public_pretraining(public: dict | None) -> str:
    """Which data the guarantee covers when training started from a public model (`train.init_from`)."""
    if not public:
        return ""
    return (
        f" The guarantee covers the private training images only: training started from a public model (content "
        f"hash {str(public.get('content_hash'))[:16]}…) trained without this guarantee on public data "
        f"(dataset hash {str(public.get('trained_on'))[:16]}…; licence {public.get('data_license') or 'not declared'}; "
        f"source {public.get('data_source') or 'not declared'}), which the guarantee does not cover."
        + (" No image of that public set has the pixels of a private image (sha256 of every image compared)."
           if (public.get("overlap_check") or {}).get("checked") else
           " Its images were not compared with the private ones.")
    )


def loosened_statement(facts: ReleaseFacts) -> Markup | str:
    """The rules the steward's policy set below synthgate's defaults (`Policy.loosened`), or "" when none."""
    if not facts.gate.loosened:
        return ""
    return (Markup("The steward's policy is **less strict than synthgate's defaults** in these rules, so a pass "
                   "here is not a pass of the default gate: ") + md_escape("; ".join(facts.gate.loosened)) + ".")


def approval_statement(facts: ReleaseFacts) -> str:
    """Who approved the release, saying plainly when nobody did."""
    a = facts.approval
    if a is None:
        return "No approval is recorded for this release."
    when = f", {a.time.isoformat()}" if a.time else ""
    if a.auto_approved:
        return f"{a.decision}: auto-approved (scripted run), no human review{when}."
    return f"{a.decision} by {a.reviewer} (human review){when}."


def card_features(facts: ReleaseFacts) -> list[dict[str, Any]]:
    """The `features` list of the card YAML: image, label (class_label, names in label order), extra columns."""
    names = {str(i): name for i, name in enumerate(facts.class_names)}
    feats: list[dict[str, Any]] = [
        {"name": "image", "dtype": "image"},
        {"name": "label", "dtype": {"class_label": {"names": names}}},
    ]
    feats += [{"name": col, "dtype": dtype} for col, dtype in facts.synthetic.columns.items()]
    return feats


def card_header(facts: ReleaseFacts, data_bytes: int | None = None) -> dict[str, Any]:
    """The YAML front matter of the card as a dict. `data_bytes`: the size of the split's image files; `datasets`
    reads `dataset_info.splits` only with name, num_examples and num_bytes all present (it warns the YAML is
    malformed otherwise), so the splits are declared only when the size is known."""
    lic = facts.release_license
    header: dict[str, Any] = {"license": hf_license(lic)}
    if header["license"] == "other":
        header["license_name"] = lic
        if url := license_url(lic):
            header["license_link"] = url
    tags = ["synthetic", "medical", "diffusion-model"]
    if facts.privacy.dp:
        tags.append("differential-privacy")
    features = card_features(facts)
    header.update(
        {
            "pretty_name": facts.title,
            "task_categories": ["image-classification"],
            "task_ids": ["multi-class-image-classification"],
            "size_categories": [size_category(facts.synthetic.total)],
            "source_datasets": [facts.source.name],
            "annotations_creators": ["machine-generated"],
            "tags": tags,
            "configs": [
                {
                    "config_name": "default",
                    "data_files": [{"split": SPLIT, "path": f"{SPLIT_DIR}/**"}],
                    "features": features,
                    "default": True,
                }
            ],
            "dataset_info": {"features": features},
        }
    )
    if data_bytes is not None:
        header["dataset_info"]["splits"] = [{"name": SPLIT, "num_bytes": int(data_bytes),
                                             "num_examples": facts.synthetic.total}]
    return header


def balance_statement(facts: ReleaseFacts) -> Markup:
    """Whether the release keeps the real class prevalence: a researcher must not read prevalence off it.
    (Fixed Markdown texts, chosen by a recorded value: nothing from the data is interpolated.)"""
    return Markup(_BALANCE_TEXT.get((facts.synthetic.generation or {}).get("balance"), _BALANCE_TEXT[None]))


_BALANCE_TEXT: dict[str | None, str] = {
    "uniform": ("The classes were generated in **equal numbers** (`balance: uniform`), not at their real "
                "prevalence (last column): a classifier trained on this set learns every class rather than the "
                "prior; recalibrate its outputs before reading probabilities as real-world risks."),
    "prior": "The classes were generated in proportion to the real training set (`balance: prior`).",
    "per_class": "The steward chose the number of images of each class; compare with the real prevalence above.",
    None: "How the class counts were chosen is not recorded.",
}


def utility_statement(facts: ReleaseFacts) -> str:
    """The floor the utility numbers are read against, and the headline ratios."""
    u = facts.utility_audit
    if u is None:
        return ""
    parts = []
    ba, worst = u.ratios.get("balanced_accuracy"), u.ratios.get("worst_class_sensitivity")
    if ba is not None:
        parts.append(f"A classifier trained on this synthetic set reaches {ba.value:.3f}× the balanced accuracy of "
                     "one trained on the real data (TSTR/TRTR, paired bootstrap)")
    if worst is not None:
        parts.append(f"{worst.value:.3f}× its sensitivity on the worst-served class")
    text = "; ".join(parts) + "." if parts else ""
    m = u.majority_baseline
    if m.get("class") is not None:
        text += (f" For comparison, always predicting the most frequent class ({m['class']}) scores balanced "
                 f"accuracy {float(m.get('balanced_accuracy', 0)):.3f} and accuracy {float(m.get('accuracy', 0)):.3f} "
                 "on the real test set.")
    return text.strip()


def template_context(facts: ReleaseFacts) -> dict[str, Any]:
    """Values the card and the datasheet templates share."""
    folders = class_folder_names(facts.class_names)
    classes = [
        {
            "index": i,
            "name": name,
            "folder": folders[i],
            "synthetic": facts.synthetic.counts_per_class.get(name, 0),
            "source": {split: c.get(name, 0) for split, c in facts.source.counts_per_class.items()},
        }
        for i, name in enumerate(facts.class_names)
    ]
    train_counts = facts.source.counts_per_class.get("train") or {}
    n_train, n_syn = sum(train_counts.values()), facts.synthetic.total
    for c in classes:
        c["synthetic_share"] = c["synthetic"] / n_syn if n_syn else None
        c["train_share"] = train_counts.get(c["name"], 0) / n_train if n_train else None
    u = facts.utility_audit
    protocols = sorted(set(u.auroc) | set(u.accuracy) | set(u.balanced_accuracy)) if u else []
    return {
        "f": facts,
        "classes": classes,
        "source_splits": list(facts.source.counts_per_class),
        "class_names_literal": Markup("[" + ", ".join(code_literal(n) for n in facts.class_names) + "]"),
        "folders_literal": Markup(", ".join(code_literal(n) for n in folders)),
        "first_file": f"{folders[0]}/{image_file_name(0, facts.synthetic.total)}",
        "metadata_csv": METADATA_CSV,
        "split_dir": SPLIT_DIR,
        "image_description": image_description(facts),
        "privacy_statement": privacy_statement(facts),
        "approval_statement": approval_statement(facts),
        "loosened_statement": loosened_statement(facts),
        "balance_statement": balance_statement(facts),
        "utility_statement": utility_statement(facts),
        "license": facts.release_license,
        "license_url": license_url(facts.release_license),
        "protocols": protocols,
        "created": facts.created.isoformat(),
        "extra_columns": list(facts.synthetic.columns),
        "publisher": facts.publisher or "the releasing organisation (not recorded)",
        "yesno": lambda v: "n/a" if v is None else ("yes" if v else "no"),
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Safe YAML without &anchors / *aliases (the features list appears twice; write it out both times)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render_dataset_card(facts: ReleaseFacts, *, data_bytes: int | None = None) -> str:
    """The bundle's README.md: YAML header (Hugging Face card metadata) + human-readable card. `data_bytes`: see
    `card_header`."""
    header = yaml.dump(
        card_header(facts, data_bytes), Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=True, width=1000
    )
    body = markdown_env().get_template("dataset_card.md.j2").render(**template_context(facts))
    return f"---\n{header}---\n\n{body}"


def parse_card_header(text: str) -> dict[str, Any]:
    """The YAML front matter of a card (empty dict when there is none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---\n", 4)
    if end < 0:
        return {}
    data = yaml.safe_load(text[4 : end + 1])
    return data if isinstance(data, dict) else {}
