"""ReleaseFacts, the dataset card (README.md) and the datasheet: content read from the facts, escaping."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import numpy as np
import pytest
from pydantic import ValidationError

from reports.dataset_card import (
    card_header,
    hf_license,
    md_escape,
    parse_card_header,
    render_dataset_card,
    size_category,
)
from reports.datasheet import SECTIONS, render_datasheet
from reports.facts import (
    ApprovalFacts,
    GateFacts,
    ModelFacts,
    PrivacyAuditFacts,
    PrivacyFacts,
    ReleaseFacts,
    SourceFacts,
    SyntheticFacts,
)
from synth.errors import InputError
from tests.release_fixtures import LEDGER, demo_facts, make_synthetic

HUMAN = ApprovalFacts(
    decision="approved",
    auto_approved=False,
    reviewer="Dr. Ada Reviewer",
    comment="Checked the audit.",
    time=datetime(2025, 1, 3, tzinfo=UTC),
)


# --- facts ------------------------------------------------------------------------------------------------


def test_facts_round_trip_through_json():
    facts = demo_facts()
    again = ReleaseFacts.model_validate_json(facts.model_dump_json())
    assert again == facts
    assert again.release_license == "CC BY 4.0"


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4), dtype=np.uint8), b"\x89PNG", list(range(5000)), {"nested": [np.float32(1.0)]}],
    ids=["ndarray", "bytes", "long-list", "numpy-scalar"],
)
def test_facts_refuse_pixel_like_data(bad):
    with pytest.raises(ValidationError, match=r"not plain JSON|list of"):
        ModelFacts(content_hash="e" * 64, training={"x": bad})
    with pytest.raises(ValidationError):
        PrivacyAuditFacts(details={"pixels": bad})


def test_facts_consistency_rules():
    with pytest.raises(ValidationError, match="epsilon, delta and accountant"):
        PrivacyFacts(dp=True, epsilon=3.0)
    with pytest.raises(ValidationError, match="reviewer"):
        ApprovalFacts(decision="approved", auto_approved=False)
    facts = demo_facts()
    with pytest.raises(ValidationError, match="real data"):
        demo_facts(synthetic=facts.synthetic.model_copy(update={"content_hash": facts.source.content_hash}))
    with pytest.raises(ValidationError):  # frozen
        facts.release_id = "other"  # type: ignore[misc]


def test_privacy_facts_from_a_real_ledger():
    from privacy.ledger import DPSGDEvent, PrivacyLedger

    ledger = PrivacyLedger(
        events=(DPSGDEvent(noise_multiplier=1.5, sample_rate=0.04, steps=1000),
                DPSGDEvent(noise_multiplier=1.2, sample_rate=0.04, steps=250)),
        delta=1e-5,
        accountant="rdp",
        epsilon=6.5,
        max_grad_norm=1.0,
        noise_multiplicity=4,
        dataset_size=4690,
    )
    p = PrivacyFacts.from_ledger(ledger.to_dict())
    assert (p.dp, p.epsilon, p.delta, p.accountant) == (True, 6.5, 1e-5, "rdp")
    assert (p.noise_multiplier, p.sample_rate, p.steps, p.noise_multiplicity) == (1.2, 0.04, 1250, 4)
    assert p.secure_rng is False and "torchcsprng" in p.secure_rng_reason
    assert PrivacyFacts.from_ledger(None) == PrivacyFacts(dp=False)


def test_source_facts_from_canonical_dataset(pneumonia_slice):
    from synth.data.canonical import load_dataset

    ds = load_dataset(pneumonia_slice)
    s = SourceFacts.from_dataset(pneumonia_slice)
    assert s.content_hash == ds.content_hash
    assert s.class_names == ("normal", "pneumonia")
    assert s.license == "CC BY 4.0" and "MedMNIST" in s.attribution
    assert s.counts["train"] == 64 and s.counts_per_class["val"] == {"normal": 16, "pneumonia": 16}
    assert s.file_sha256 == ds.header["source"]["sha256"]
    assert (s.image.height, s.image.width, s.image.channels) == (28, 28, 1)


# --- dataset card -----------------------------------------------------------------------------------------


def test_card_yaml_header_parses_and_declares_features():
    facts = demo_facts()
    text = render_dataset_card(facts)
    header = parse_card_header(text)
    assert header == card_header(facts)
    assert header["license"] == "cc-by-4.0"
    assert header["task_categories"] == ["image-classification"]
    assert header["size_categories"] == ["n<1K"]
    assert header["source_datasets"] == ["pneumoniamnist"]
    assert {"synthetic", "medical", "differential-privacy"} <= set(header["tags"])
    (config,) = header["configs"]
    assert config["data_files"] == [{"split": "train", "path": "data/train/**"}]
    features = header["dataset_info"]["features"]
    assert config["features"] == features
    assert features[0] == {"name": "image", "dtype": "image"}
    assert features[1] == {"name": "label", "dtype": {"class_label": {"names": {"0": "normal", "1": "pneumonia"}}}}
    assert [f["name"] for f in features[2:]] == ["image_id", "seed", "sex"]
    assert "&id" not in text.split("\n---\n", 1)[0]  # no YAML anchors/aliases


def test_card_features_are_what_datasets_understands():
    from datasets import ClassLabel, Features

    header = parse_card_header(render_dataset_card(demo_facts()))
    features = Features._from_yaml_list(header["dataset_info"]["features"])
    assert isinstance(features["label"], ClassLabel)
    assert features["label"].names == ["normal", "pneumonia"]
    assert features["seed"].dtype == "int64"


def test_card_text_dp_and_not_dp():
    dp = render_dataset_card(demo_facts())
    assert "ε = 7.93, δ = 1.0e-05" in dp and "prv accountant" in dp
    assert "not differentially private" not in dp
    plain = render_dataset_card(demo_facts(privacy=PrivacyFacts.not_private()))
    assert "not differentially private" in plain and "ε =" not in plain
    assert "differential-privacy" not in parse_card_header(plain)["tags"]


def test_card_explains_loading_verifying_and_attribution():
    text = render_dataset_card(demo_facts())
    assert 'load_dataset("imagefolder", data_dir="path/to/BUNDLE/data"' in text
    assert 'ClassLabel(names=["normal", "pneumonia"])' in text
    assert "ImageFolder(" in text
    assert "synthgate verify path/to/BUNDLE --key release.pub" in text
    assert ("model_signing verify key path/to/BUNDLE --signature path/to/BUNDLE/release.sig "
            "--public_key release.pub") in text
    assert "CC BY 4.0" in text and "Kermany et al., Cell 2018" in text and "MedMNIST v2" in text
    assert "@misc{synthgate-rel-demo-001" in text
    for heading in ("## How to load", "## How to verify", "## Audits", "## Limitations", "## License and attribution",
                    "## Citation"):
        assert heading in text
    assert "| TSTR | 0.840 (95% CI 0.810–0.870) | 0.740 (normal) | 0.880 (95% CI 0.850–0.910) | 0.820 |" in text
    # The headline ratios and the majority-class floor, in words.
    assert "0.944× the balanced accuracy" in text and "0.914× its sensitivity on the worst-served class" in text
    assert "always predicting the most frequent class (pneumonia) scores balanced accuracy 0.500" in text


def test_card_and_datasheet_say_the_images_are_marked_synthetic():
    facts = demo_facts()
    card, sheet = render_dataset_card(facts), render_datasheet(facts)
    assert "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia" in card
    assert "XMP" in card and "`rel-demo-001`" in card
    assert "trainedAlgorithmicMedia" in sheet and "XMP" in sheet and "rel-demo-001" in sheet


def test_license_helpers():
    assert hf_license("CC BY 4.0") == "cc-by-4.0"
    assert hf_license("unknown") == "unknown"
    assert hf_license("Hospital data use agreement") == "other"
    header = card_header(demo_facts(license="Hospital data use agreement"))
    assert header["license"] == "other" and header["license_name"] == "Hospital data use agreement"
    assert [size_category(n) for n in (5, 5000, 50_000)] == ["n<1K", "1K<n<10K", "10K<n<100K"]


# --- datasheet --------------------------------------------------------------------------------------------


def _sections(text: str) -> list[str]:
    return re.findall(r"^## (.+)$", text, flags=re.M)


def test_datasheet_has_the_seven_sections_in_order():
    assert _sections(render_datasheet(demo_facts())) == list(SECTIONS)
    assert SECTIONS == (
        "Motivation", "Composition", "Collection process", "Preprocessing/cleaning/labeling", "Uses",
        "Distribution", "Maintenance",
    )


def test_datasheet_reads_the_chain():
    facts = demo_facts()
    text = render_datasheet(facts)
    for value in (facts.source.content_hash, facts.source.file_sha256, facts.model.content_hash,
                  facts.synthetic.content_hash):
        assert value in text
    assert "| ε spent | 7.930 |" in text and "| δ | 1.0e-05 |" in text and "| accountant | prv |" in text
    assert "| noise multiplicity K | 4 |" in text
    assert "independent ε check | dp-accounting 0.6.0 pld: 7.950" in text
    assert "Membership inference AUC: 0.520" in text
    assert "Verdict: **pass**" in text
    assert "| 0 | normal | 4 | 2345 | 258 | 310 |" in text


def test_datasheet_states_the_canary_audit_of_a_dp_release():
    facts = demo_facts()
    assert "canary audit" not in render_datasheet(facts)  # not run: not claimed
    audited = facts.privacy.model_copy(update={"empirical_audit": {
        "verdict": "consistent", "epsilon_lower_bound": 0.21, "claimed_epsilon": 1.0, "epsilon_ceiling": 4.62,
        "canaries": 1000}})
    text = render_datasheet(demo_facts(privacy=audited))
    assert ("| empirical check (canary audit) | consistent: a separate DP run of the same code at ε = 1.00 with "
            "1000 canaries shows ε ≥ 0.21") in text
    assert "can show up to ε ≈ 4.6" in text


def test_datasheet_says_when_approval_was_automatic():
    auto = render_datasheet(demo_facts())
    assert "auto-approved (scripted run), no human review" in auto
    human = render_datasheet(demo_facts(approval=HUMAN))
    assert "approved by Dr. Ada Reviewer (human review)" in human
    assert "auto-approved" not in human
    assert "> Checked the audit." in human
    none = render_datasheet(demo_facts(approval=None))
    assert "No approval is recorded" in none


def test_card_and_datasheet_declare_a_policy_looser_than_the_defaults():
    lowered = demo_facts(gate=GateFacts(verdict="pass", loosened=("min_trts_balanced_accuracy = 0.3 (default 0.7)",)))
    for text in (render_dataset_card(lowered), render_datasheet(lowered)):
        plain = text.replace("\\", "")  # markdown escapes the rule's underscores
        assert "less strict than synthgate's defaults" in plain and "min_trts_balanced_accuracy = 0.3" in plain
    assert "under a policy less strict than the defaults" in render_dataset_card(lowered)
    for text in (render_dataset_card(demo_facts()), render_datasheet(demo_facts())):
        assert "less strict than" not in text


def test_datasheet_not_dp():
    text = render_datasheet(demo_facts(privacy=PrivacyFacts.not_private()))
    assert "not differentially private" in text
    assert "ε spent" not in text


# --- injection --------------------------------------------------------------------------------------------

EVIL_COMMENT = (
    "<script>alert(1)</script>\n"
    "# Approved by the CEO\n"
    "[click here](javascript:alert(1)) ![pixel](http://evil.example/t.png)\n"
    '<img src=x onerror="alert(2)"> **bold** `code`\n'
    "---\n"
    "1. item"
)
EVIL_NAME = "<b>Eve</b> [x](http://evil.example)"


def _evil_facts() -> ReleaseFacts:
    approval = ApprovalFacts(decision="approved", auto_approved=False, reviewer=EVIL_NAME, comment=EVIL_COMMENT)
    return demo_facts(approval=approval, title="Synthetic <iframe src=x></iframe> set", purpose=EVIL_COMMENT)


@pytest.mark.parametrize("render", [render_dataset_card, render_datasheet], ids=["card", "datasheet"])
def test_reviewer_comment_cannot_inject_html_or_markdown(render):
    markdown_it = pytest.importorskip("markdown_it")
    text = render(_evil_facts())
    body = text.split("\n---\n", 1)[1] if text.startswith("---\n") else text
    for raw in ("<script", "<img", "<iframe", "<b>"):
        assert raw not in body, raw
    # Link / image syntax survives only backslash-escaped (rendered as literal text).
    assert not re.search(r"(?<!\\)\]\((javascript|http://evil)", body)
    assert "![pixel" not in body
    assert "&lt;script&gt;" in body
    assert not re.search(r"^#+ Approved", body, flags=re.M)
    # Rendered as CommonMark with raw HTML enabled: nothing executable or linked comes out.
    html = markdown_it.MarkdownIt("commonmark").render(body)
    for bad in ("<script", "<img", "<iframe", "<b>", 'href="javascript', "evil.example/t.png\"", "<h1>Approved"):
        assert bad not in html, bad
    assert "<h1>Synthetic" in html or "<h1>Datasheet: Synthetic" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # shown as text


def test_md_escape_neutralises_line_starts():
    assert md_escape("1. item") == "1\\. item"
    assert md_escape("- x") == "\\- x"
    assert md_escape("# h") == "\\# h"
    assert md_escape("---") == "\\---"
    assert md_escape("7.93") == "7.93"  # numbers are not list markers
    assert md_escape("a\nb\r\nc") == "a b c"
    assert md_escape("a|b") == "a\\|b"


def test_human_approval_reviewer_in_card_and_escaped():
    text = render_dataset_card(_evil_facts())
    assert "&lt;b&gt;Eve&lt;/b&gt; \\[x\\](http://evil.example) (human review)" in text
    assert LEDGER["accountant"] in text


def test_synthetic_facts_from_a_generated_set(tmp_path):
    syn = make_synthetic(tmp_path / "syn", per_class=3)
    s = SyntheticFacts.from_dataset(syn)
    assert s.sampler == "ddim-25"
    assert (s.seed_min, s.seed_max) == (1000, 1005)
    assert s.counts_per_class == {"normal": 3, "pneumonia": 3} and s.total == 6
    assert s.columns == {"image_id": "string", "seed": "int64", "sex": "string"}
    assert s.generation["unet_batch_size"] == 64 and "conditions" in s.generation
    assert "/private/path" not in s.model_dump_json()  # local paths stay out of public documents


def test_model_and_privacy_facts_from_a_model_dir(tmp_path):
    from synth.artifacts import write_header, write_json

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    body = {
        "conditions": {"class_names": ["normal", "pneumonia"],
                       "attributes": [{"name": "sex", "values": ["F", "M"]}], "num_conditions": 4},
        "weights": {"ema": "unet_ema", "raw": "unet", "default": "ema"},
        "steps": 1500, "final_loss": 0.03, "training_seconds": 12.5, "device": "cpu",
        "loss_curve": [[i, 0.1] for i in range(50)], "seeds": {"torch": 1},
    }
    write_header(model, "model_card.json", kind="model", schema_version=1, files=["model_index.json"],
                 config={"model": {}, "train": {"preset": "tiny", "batch_size": 64, "lr": 2e-4, "max_steps": None}},
                 body=body)
    m = ModelFacts.from_model_dir(model)
    assert m.preset == "tiny" and m.weights == "ema" and m.num_conditions == 4
    assert m.condition_attributes == {"sex": ("F", "M")}
    assert m.training == {"batch_size": 64, "lr": 2e-4, "steps": 1500, "final_loss": 0.03,
                          "training_seconds": 12.5, "device": "cpu"}
    assert len(m.content_hash) == 64
    assert PrivacyFacts.from_model_dir(model) == PrivacyFacts.not_private()
    write_json(model / "privacy_ledger.json", LEDGER)
    p = PrivacyFacts.from_model_dir(model)
    assert p.dp and p.epsilon == LEDGER["epsilon"] and p.noise_multiplicity == 4
    (model / "privacy_ledger.json").write_text("{broken")
    with pytest.raises(InputError, match=r"privacy_ledger\.json: cannot be read as JSON"):
        PrivacyFacts.from_model_dir(model)


def test_sampler_label_from_a_config_dump_keeps_its_noise_schedule(tmp_path):
    """Without a `sampler_label`, the datasheet's sampler name is built from the SamplerConfig dump, schedule
    included (the default `sde-dpmsolver++-karras-12` must not read as the old `sde-dpmsolver++-12`)."""
    import pandas as pd

    from reports.facts import SyntheticFacts
    from synth.data.canonical import write_dataset

    def synthetic(name, sampler):
        meta = pd.DataFrame({"image_id": ["gen-0", "gen-1"], "split": "synthetic", "label": [0, 1]})
        return write_dataset(tmp_path / name, np.zeros((2, 8, 8), np.uint8), meta, class_names=["a", "b"],
                             source={"format": "synthetic"}, config={"sampler": sampler})

    karras = synthetic("k", {"name": "sde-dpmsolver++", "steps": 12, "step_schedule": "karras"})
    assert SyntheticFacts.from_dataset(karras).sampler == "sde-dpmsolver++-karras-12"
    assert SyntheticFacts.from_dataset(synthetic("d", {"name": "ddim", "steps": 25})).sampler == "ddim-25"


def test_card_and_datasheet_state_released_and_real_class_prevalence():
    base = demo_facts()
    real = base.source.model_copy(update={"counts_per_class": {
        "train": {"normal": 1214, "pneumonia": 3476}, "val": {"normal": 135, "pneumonia": 381},
        "test": {"normal": 234, "pneumonia": 387}}})
    uniform = base.synthetic.model_copy(update={
        "counts_per_class": {"normal": 300, "pneumonia": 300},
        "generation": {"balance": "uniform", "sampler": {"guidance_scale": 1.0},
                       "guidance_selection": {"guidance_scale": 1.0, "objective": "val balanced accuracy",
                                              "candidates": [{"guidance_scale": 1.0, "balanced_accuracy": 0.88},
                                                             {"guidance_scale": 2.0, "balanced_accuracy": 0.84}]}}})
    facts = demo_facts(synthetic=uniform, source=real, model=base.model.model_copy(update={"guidance_scale": 1.0}))
    card = render_dataset_card(facts)
    assert "| 0 | normal | `0_normal` | 300 | 50.00% | 25.88% |" in card
    assert "| 1 | pneumonia | `1_pneumonia` | 300 | 50.00% | 74.12% |" in card
    assert "generated in **equal numbers** (`balance: uniform`), not at their real prevalence" in card
    assert "chosen on the real **validation** split (never the test split)" in card and "2.0 → 0.840" in card
    sheet = render_datasheet(facts)
    assert "generated in **equal numbers**" in sheet
    assert "chosen on the real validation split, never the test split" in sheet
    floored = uniform.model_copy(update={"generation": {**uniform.generation, "guidance_selection": {
        **uniform.generation["guidance_selection"], "trts_floor": 0.7, "ratio_floor": 0.85,
        "candidates": [{"guidance_scale": 1.0, "balanced_accuracy": 0.88, "trts_balanced_accuracy": 0.55},
                       {"guidance_scale": 2.0, "balanced_accuracy": 0.84, "trts_balanced_accuracy": 0.81}]}}})
    card = render_dataset_card(demo_facts(synthetic=floored, source=real))
    assert "recognised with balanced accuracy ≥ 0.7 (TRTS" in card and "2.0 → 0.840, TRTS 0.810" in card
    assert "2.0: balanced accuracy 0.840, TRTS 0.810; TRTS floor 0.7" in render_datasheet(
        demo_facts(synthetic=floored, source=real))
    assert "≥ 0.85× the real-trained one's balanced accuracy on val, or, when none did, the one closest" in card
    assert "TSTR/TRTR ratio floor 0.85" in render_datasheet(demo_facts(synthetic=floored, source=real))
    prior = render_dataset_card(demo_facts(synthetic=uniform.model_copy(update={"generation": {"balance": "prior"}}),
                                           source=real))
    assert "in proportion to the real training set (`balance: prior`)" in prior


def test_card_and_datasheet_name_the_training_step_chosen_on_val():
    base = demo_facts()
    selection = {"guidance_scale": 2.0, "weights": "ema@800", "weights_step": 800, "objective": "val",
                 "candidates": [{"guidance_scale": 2.0, "balanced_accuracy": 0.91}],
                 "weights_candidates": [{"weights": "ema@400", "step": 400, "guidance_scale": 2.0,
                                         "balanced_accuracy": 0.88},
                                        {"weights": "ema@800", "step": 800, "guidance_scale": 2.0,
                                         "balanced_accuracy": 0.91},
                                        {"weights": "ema", "step": 2400, "guidance_scale": 2.0,
                                         "balanced_accuracy": 0.80}]}
    synthetic = base.synthetic.model_copy(update={"generation": {"balance": "uniform",
                                                                 "guidance_selection": selection}})
    facts = demo_facts(synthetic=synthetic, model=base.model.model_copy(update={"guidance_scale": 2.0}))
    card = render_dataset_card(facts)
    assert "EMA weights after **800** training steps" in card
    assert "step 400 → 0.880, step 800 → 0.910, step 2400 → 0.800" in card
    sheet = render_datasheet(facts)
    assert "from the EMA weights after 800 training steps" in sheet and "step 2400: 0.800" in sheet
    without = render_dataset_card(demo_facts(synthetic=base.synthetic.model_copy(update={"generation": {
        "guidance_selection": {**selection, "weights_candidates": []}}})))
    assert "training steps, chosen" not in without
    # A DP release says the validation images that chose are not covered by ε; a non-DP one has no ε to qualify.
    assert base.privacy.dp
    assert "are not covered by ε: they only chose the weights and the guidance scale among 4 candidates" in card
    plain = demo_facts(synthetic=synthetic, privacy=PrivacyFacts(dp=False))
    assert "validation images that made these choices" not in render_dataset_card(plain)
