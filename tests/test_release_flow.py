"""The whole release flow end to end on a small slice of the real PneumoniaMNIST, through Prefect (ephemeral).

One module-scoped run is shared by the checks: it crashes once in the middle of training, is rerun, resumes
from its checkpoint and publishes a bundle that verifies, loads with `datasets`, and whose Croissant validates.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from flows.cli import run
from flows.keys import generate_keys, load_public_key
from flows.release_config import ReleaseConfig
from flows.signing import verify_bundle
from synth.data.canonical import load_dataset

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def write_real_slice(npz_in, npz_out, sizes, seed=0):
    """A class-balanced slice of the real .npz, in MedMNIST layout."""
    rng = np.random.default_rng(seed)
    src = np.load(npz_in)
    arrays = {}
    for split, n in sizes.items():
        labels = src[f"{split}_labels"][:, 0]
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), n // 2, replace=False)
                                      for c in (0, 1)]))
        arrays[f"{split}_images"] = src[f"{split}_images"][idx]
        arrays[f"{split}_labels"] = src[f"{split}_labels"][idx]
    np.savez(npz_out, **arrays)
    return npz_out


# A 24-step tiny model cannot carry the clinical signal: these tests exercise the flow's mechanics, so the utility
# checks are off here; `test_default_policy_blocks_the_tiny_model_on_utility` runs the same stages with them on.
UTILITY_OFF = {"min_tstr_trtr_balanced_accuracy_ratio": None, "min_tstr_trtr_worst_class_ratio": None,
               "min_trts_balanced_accuracy": None}


def small_config(tmp, source, **updates):
    data = {
        "policy": UTILITY_OFF,
        "title": "Synthetic PneumoniaMNIST slice",
        "workdir": str(tmp / "work"),
        "releases_dir": str(tmp / "releases"),
        "private_key": str(tmp / "keys" / "release.key"),
        "device": "cpu",
        "source": {"path": str(source), "min_per_class": 5, "classes": ["normal", "pneumonia"],
                   "license": "CC BY 4.0", "attribution": "MedMNIST v2 (Yang et al. 2023); Kermany et al. 2018"},
        "train": {"preset": "tiny", "max_steps": 24, "checkpoint_every": 8, "batch_size": 32},
        # guidance_scale "auto" (the default): chosen on real val from two candidates, with a 1-epoch classifier.
        "generate": {"n": 48, "batch_size": 48, "steps": 8,
                     "guidance_selection": {"candidates": [1.0, 2.0], "extend": [], "per_class": 10,
                                            "classifier": {"epochs": 1, "min_steps": None, "threads": 1},
                                            # Explicit, so that the default-policy run below reuses
                                            # every stage (the floor otherwise follows the policy).
                                            "trts_floor": None,
                                            "real_classifier": {"epochs": 1, "min_steps": None, "threads": 1}}},
        "privacy_audit": {"encoder": {"steps": 20, "batch_size": 64}},
        "utility_audit": {"classifier": {"epochs": 1, "threads": 1, "min_steps": None}, "n_boot": 50, "ratios": [1.0],
                          "fidelity": False},
        "approval": {"auto_approve": True},
    }
    data.update(updates)
    return ReleaseConfig.model_validate(data)


@pytest.fixture(scope="module")
def prefect_server():
    """One temporary Prefect server for the module, stopped while pytest still captures its output."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def released(tmp_path_factory, pneumonia_npz, prefect_server):
    import synth.training as training

    tmp = tmp_path_factory.mktemp("release")
    generate_keys(tmp / "keys")
    source = write_real_slice(pneumonia_npz, tmp / "slice.npz", {"train": 96, "val": 48, "test": 48})
    cfg = small_config(tmp, source)

    from flows.release import release

    # First run: the process dies in the middle of training (after the step-8 checkpoint, before step 12's),
    # without a chance to save: only the periodic checkpoint survives.
    real_train = training.train

    class Killed(Exception):
        pass

    def crashing_train(*args, **kwargs):
        def on_step(step, loss):
            if step == 12:
                raise Killed("simulated kill")
        return real_train(*args, **kwargs, on_step=on_step)

    training.train = crashing_train
    try:
        with pytest.raises(Killed):
            release(config=cfg)
    finally:
        training.train = real_train
    assert (tmp / "work" / "model.ckpt").is_dir() and not (tmp / "work" / "model").exists()
    result = release(config=cfg)
    return tmp, cfg, result


def test_release_is_published_and_verifies(released):
    tmp, _, result = released
    assert result.status == "published"
    bundle = result.bundle
    assert bundle.parent == tmp / "releases"
    verified = verify_bundle(bundle, load_public_key(tmp / "keys" / "release.pub"))
    assert verified.predicate["approval"]["auto_approved"] is True
    index = json.loads((tmp / "releases" / "index.json").read_text())
    assert [r["release_id"] for r in index["releases"]] == [result.release_id]
    assert not list(bundle.rglob("*.key")), "the private key never enters a bundle"
    _check_standard_signature_and_marks(tmp, bundle, result.release_id)
    # The guidance scale was chosen on the real validation split; the documents say so, and which was used.
    selection = json.loads((tmp / "work" / "guidance-selection" / "guidance.json").read_text())
    chosen = selection["guidance_scale"]
    assert chosen in (1.0, 2.0) and len(selection["candidates"]) == 2
    assert set(load_dataset(tmp / "work" / "synthetic").metadata["guidance_scale"]) == {chosen}
    datasheet = (bundle / "datasheet.md").read_text()
    assert f"guidance scale {chosen}" in datasheet and "chosen on the real validation split" in datasheet
    card = (bundle / "README.md").read_text()
    assert "generated in **equal numbers**" in card


def test_training_resumed_from_checkpoint(released):
    tmp, _, _ = released
    card = json.loads((tmp / "work" / "model" / "model_card.json").read_text())
    assert card["resumed_from_step"] == 8 and card["steps"] == 24
    assert not (tmp / "work" / "model.ckpt").exists()


def test_bundle_has_no_real_pixels_and_loads_with_datasets(released, tmp_path):
    tmp, _, result = released
    from PIL import Image

    real = set(load_dataset(tmp / "work" / "dataset").metadata["sha256"])
    import hashlib

    pngs = sorted((result.bundle / "data").rglob("*.png"))
    assert pngs
    for png in pngs:
        assert hashlib.sha256(np.asarray(Image.open(png)).tobytes()).hexdigest() not in real
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    ds = datasets.load_dataset(str(result.bundle), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.features["label"].names == ["normal", "pneumonia"]
    released_meta = load_dataset(tmp / "work" / "synthetic-released").metadata
    assert sorted(ds["label"]) == sorted(released_meta["label"].tolist())


def test_croissant_validates_and_documents_match(released):
    from reports.croissant import validate_croissant

    _, _, result = released
    assert validate_croissant(result.bundle / "croissant.json") == []
    datasheet = (result.bundle / "datasheet.md").read_text()
    assert "auto-approved" in datasheet.lower()
    html = (result.bundle / "report" / "report.html").read_text()
    assert 'id="memorization"' in html


def test_rerun_reuses_every_stage(released):
    tmp, cfg, _ = released
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp / "work" / ".stages").iterdir()}
    from flows.stages import generate_stage, guidance_stage, ingest_stage, train_stage
    from synth.errors import ConfigError

    dataset = ingest_stage(cfg)
    model = train_stage(cfg, dataset)
    with pytest.raises(ConfigError, match="guidance_scale is 'auto'"):
        generate_stage(cfg, model)
    generate_stage(guidance_stage(cfg, dataset, model), model)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp / "work" / ".stages").iterdir()} == stamps


def test_cli_release_needs_a_key(tmp_path, capsys):
    assert run(["release", "--key", str(tmp_path / "nokey"), "--workdir", str(tmp_path / "w")]) == 2
    assert "synthgate keys generate" in capsys.readouterr().err


def _run_paused_release(cfg, decision):
    """Run the flow in a thread, wait until it pauses for approval, answer with `decision`, return the result."""
    import threading
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    from flows.release import release

    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", release(config=cfg)), daemon=True)
    thread.start()
    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + 240
    run_id = None
    while run_id is None and time.monotonic() < deadline and thread.is_alive():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=paused)
        run_id = runs[0].id if runs else None
        time.sleep(1)
    assert run_id is not None, "the release flow never paused for approval"
    # What the Prefect UI shows beside the form: the shell command for this very run, and the key numbers.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    key = ArtifactFilter(key=ArtifactFilterKey(any_=["approval-request"]))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=key)
    shown = [a.data for a in artifacts if a.flow_run_id == run_id]
    assert shown and f"synthgate approve {run_id} --reviewer" in shown[0]
    assert "Membership inference AUC" in shown[0] and "balanced-accuracy ratio" in shown[0]
    resume_flow_run(run_id, run_input=decision)
    thread.join(240)
    return out["result"]


def test_default_policy_blocks_the_tiny_model_on_utility(released):
    """The default gate judges utility: the tiny model's synthetic set does not train a usable classifier, so the
    same run (every stage reused) is blocked with the reason, and nothing is published."""
    from flows.policy import Policy
    from flows.release import release

    tmp, cfg, _ = released
    default = cfg.model_copy(update={"policy": Policy(), "releases_dir": tmp / "releases-default-policy"})
    with pytest.raises(Exception, match=r"blocked by the gate: .*TRTS balanced accuracy [0-9.]+ < 0.7"):
        release(config=default)
    assert not (tmp / "releases-default-policy").exists()
    verdict = json.loads((tmp / "work" / "verdict.json").read_text())
    checks = {c["rule"]: c for c in verdict["checks"]}
    assert {"min_tstr_trtr_balanced_accuracy_ratio", "min_tstr_trtr_worst_class_ratio",
            "min_trts_balanced_accuracy"} <= set(checks)
    assert checks["min_trts_balanced_accuracy"]["passed"] is False


def test_steward_approval_goes_into_the_bundle(released):
    tmp, cfg, _ = released
    manual = cfg.model_copy(update={
        "releases_dir": tmp / "releases-manual",
        "approval": cfg.approval.model_copy(update={"auto_approve": False, "timeout_s": 300}),
    })
    result = _run_paused_release(manual, {"approve": True, "reviewer": "Dr. A. Steward",
                                          "comment": "<b>checked</b> the closest pairs"})
    assert result.status == "published"
    datasheet = (result.bundle / "datasheet.md").read_text()
    assert "Dr. A. Steward" in datasheet and "<b>checked</b>" not in datasheet
    predicate = verify_bundle(result.bundle, load_public_key(tmp / "keys" / "release.pub")).predicate
    assert predicate["approval"]["auto_approved"] is False and predicate["approval"]["reviewer"] == "Dr. A. Steward"


def test_rejected_release_is_never_published(released):
    tmp, cfg, _ = released
    manual = cfg.model_copy(update={
        "releases_dir": tmp / "releases-rejected",
        "approval": cfg.approval.model_copy(update={"auto_approve": False, "timeout_s": 300}),
    })
    result = _run_paused_release(manual, {"approve": False, "reviewer": "Dr. B", "comment": "not yet"})
    assert result.status == "rejected" and result.bundle is None
    assert not (tmp / "releases-rejected").exists() or not any((tmp / "releases-rejected").iterdir())


def test_planted_training_copies_block_the_release(released, tmp_path):
    """A synthetic set that holds copies of training images is blocked, even though filtering would drop them."""
    from flows.policy import Policy, gate
    from flows.stages import gate_inputs
    from privacy.audit import audit_privacy
    from privacy.audit_config import PrivacyAuditConfig
    from synth.data.canonical import write_dataset

    tmp, cfg, _ = released
    work = tmp / "work"
    syn = load_dataset(work / "synthetic")
    train_images, train_meta = load_dataset(work / "dataset").split("train")
    images = np.asarray(syn.images).copy()
    planted = len(images) // 4
    images[:planted] = train_images[:planted]  # a generator that memorised a quarter of its output
    meta = syn.metadata.drop(columns="sha256").copy()
    meta.loc[: planted - 1, "label"] = train_meta["label"].to_numpy()[:planted]
    bad = write_dataset(tmp_path / "planted", images, meta, class_names=syn.class_names,
                        source=syn.header["source"], inputs=syn.header["inputs"])
    audit = audit_privacy(work / "dataset", bad, tmp_path / "audit", model_dir=work / "model",
                          config=PrivacyAuditConfig.model_validate(cfg.privacy_audit),
                          filter_out=tmp_path / "filtered")
    inputs = gate_inputs(audit, work / "audit-utility", work / "model", tmp_path / "filtered")
    assert inputs.flagged_fraction == 0.0 and inputs.flagged_fraction_before_filter >= 0.25
    verdict = gate(inputs, Policy(**UTILITY_OFF))
    assert verdict.decision == "block"
    assert [c.rule for c in verdict.checks if not c.passed] == ["max_flagged_fraction_before_filter"]
    # Without filtering, the copies would be released: blocked by the released-set rule too.
    unfiltered = gate(gate_inputs(audit, work / "audit-utility", work / "model", bad), Policy(**UTILITY_OFF))
    assert {"max_flagged_fraction", "max_flagged_fraction_before_filter"} <= {
        c.rule for c in unfiltered.checks if not c.passed}


def test_dp_release_carries_a_checked_epsilon(released):
    """A DP run: the ledger's ε is recomputed independently, the gate enforces the policy's bound, and the
    datasheet and provenance state ε and δ."""
    from flows.policy import Policy
    from flows.release import release
    from flows.release_config import DPSettings

    tmp, cfg, _ = released
    dp_cfg = cfg.model_copy(update={
        "workdir": tmp / "work-dp", "releases_dir": tmp / "releases-dp", "title": "DP slice",
        "dp": DPSettings(enabled=True, epsilon=8.0),
        "policy": Policy(require_dp=True, max_epsilon=10.0, max_delta=1e-2, **UTILITY_OFF),
    })
    result = release(config=dp_cfg)
    assert result.status == "published"
    verdict = json.loads((tmp / "work-dp" / "verdict.json").read_text())
    passed = {c["rule"] for c in verdict["checks"] if c["passed"]}
    assert {"require_dp", "max_epsilon", "max_delta", "ledger_check", "dp_audit"} <= passed
    # The canary audit of the DP implementation ran beside training (its own DP run at ε = 1) and is stated.
    dp_audit = json.loads((tmp / "work-dp" / "dp-audit" / "dp_audit.json").read_text())
    assert dp_audit["verdict"] == "consistent" and dp_audit["claimed_epsilon"] == pytest.approx(1.0, abs=0.05)
    predicate = verify_bundle(result.bundle, load_public_key(tmp / "keys" / "release.pub")).predicate
    eps = predicate["privacy"]["epsilon"]
    assert 0 < eps <= 8.0 and predicate["privacy"]["delta"] < 1 / 96
    datasheet = (result.bundle / "datasheet.md").read_text()
    assert "differential privacy ledger" in datasheet and f"| ε spent | {eps:.3f}" in datasheet
    assert "| empirical check (canary audit) | consistent: a separate DP run of the same code at ε = " in datasheet
    audit = json.loads((tmp / "work-dp" / "audit-privacy" / "privacy.json").read_text())
    assert audit["ledger_check"]["passed"] is True

    # The same run against a stricter policy is blocked, with the reason, and nothing is published.
    strict = dp_cfg.model_copy(update={"policy": Policy(require_dp=True, max_epsilon=1.0, **UTILITY_OFF),
                                       "releases_dir": tmp / "releases-dp-strict"})
    with pytest.raises(Exception, match=r"blocked by the gate: ε [0-9.]+ > 1"):
        release(config=strict)
    assert not (tmp / "releases-dp-strict").exists()



def test_dp_release_with_public_pretraining_documents_what_the_guarantee_covers(released, data_dir):
    """`public_pretraining:` through the Prefect flow: the public model is a cached stage, training starts from it
    with DP, and the published datasheet and dataset card say the guarantee covers the private data only."""
    from flows.release import release
    from flows.release_config import DPAuditSettings, DPSettings

    tmp, cfg, _ = released
    pre_cfg = cfg.model_copy(update={
        "workdir": tmp / "work-public", "releases_dir": tmp / "releases-public", "title": "DP slice, pretrained",
        "dp": DPSettings(enabled=True, epsilon=8.0, accountant="rdp"),
        # The canary audit is tested in test_dp_release_carries_a_checked_epsilon; here it would only cost time.
        "dp_audit": DPAuditSettings(enabled=False),
        "policy": cfg.policy.model_copy(update={"require_dp_audit": False}),
    })
    pre_cfg = type(cfg).model_validate({**pre_cfg.model_dump(), "public_pretraining": {
        "source": {"path": str(data_dir / "covid_cxr_128.npz"), "size": 28},
        "license": "per image, see covid_cxr_128_meta.csv", "attribution": "Cohen et al. COVID-19 image data (2020)",
        "train": {"preset": "tiny", "max_steps": 4, "batch_size": 32}}})
    result = release(config=pre_cfg)
    assert result.status == "published"
    public_card = json.loads((tmp / "work-public" / "public-model" / "model_card.json").read_text())
    card = json.loads((tmp / "work-public" / "model" / "model_card.json").read_text())
    assert card["inputs"]["init_from"] == public_card["content_hash"]
    for doc in ("datasheet.md", "README.md"):
        text = (result.bundle / doc).read_text()
        assert "covers the private training images only" in text and public_card["content_hash"][:16] in text
        assert "Cohen et al. COVID-19 image data (2020)" in text


def test_latent_release_publishes_decoded_pixels(released):
    """The latent generator through the whole flow: autoencoder + latent UNet, audited and released as 28×28
    pixels; the model directory keeps both parts and the documents name the kind."""
    from flows.release import release

    tmp, cfg, _ = released
    train = cfg.train.model_copy(update={"kind": "latent", "autoencoder": cfg.train.autoencoder.model_copy(
        update={"max_steps": 12})})
    latent_cfg = cfg.model_copy(update={"workdir": tmp / "work-latent", "releases_dir": tmp / "releases-latent",
                                        "title": "Latent slice", "train": train})
    result = release(config=latent_cfg)
    assert result.status == "published"
    verify_bundle(result.bundle, load_public_key(tmp / "keys" / "release.pub"))
    model = tmp / "work-latent" / "model"
    card = json.loads((model / "model_card.json").read_text())
    assert card["generator"]["kind"] == "latent" and (model / "vae" / "config.json").is_file()
    synthetic = load_dataset(tmp / "work-latent" / "synthetic")
    assert synthetic.images.shape[1:] == (28, 28) and synthetic.images.dtype == np.uint8
    assert "latent diffusion" in (result.bundle / "datasheet.md").read_text()


def test_latent_dp_release_trains_its_autoencoder_with_dp_and_says_so(released):
    """A DP release of the latent generator: the autoencoder is DP-trained at its share of ε, the one ledger's ε
    (both parts composed) passes the gate, and the datasheet and dataset card say the guarantee covers both."""
    from flows.policy import Policy
    from flows.release import release
    from flows.release_config import DPAuditSettings, DPSettings

    tmp, cfg, _ = released
    train = cfg.train.model_copy(update={"kind": "latent", "max_steps": 8, "autoencoder":
                                         cfg.train.autoencoder.model_copy(update={"max_steps": 8})})
    dp_cfg = cfg.model_copy(update={
        "workdir": tmp / "work-latent-dp", "releases_dir": tmp / "releases-latent-dp", "title": "Latent DP slice",
        "train": train, "dp": DPSettings(enabled=True, epsilon=8.0, accountant="rdp"),
        "dp_audit": DPAuditSettings(enabled=False),  # tested in test_dp_release_carries_a_checked_epsilon
        "policy": Policy(require_dp=True, max_epsilon=8.0, max_delta=1e-2, require_dp_audit=False, **UTILITY_OFF),
    })
    result = release(config=dp_cfg)
    assert result.status == "published"
    ledger = json.loads((tmp / "work-latent-dp" / "model" / "privacy_ledger.json").read_text())
    assert ledger["autoencoder"]["trained_with"] == "dp" and len(ledger["events"]) == 2
    eps = verify_bundle(result.bundle, load_public_key(tmp / "keys" / "release.pub")).predicate["privacy"]["epsilon"]
    assert eps == pytest.approx(ledger["epsilon"]) and eps <= 8.0
    for doc in ("datasheet.md", "README.md"):
        text = (result.bundle / doc).read_text()
        assert "autoencoder was trained with DP-SGD on the same private images, with 20% of the target ε" in text
        assert "the guarantee covers both parts" in text
    assert "AutoencoderKL trained with DP-SGD" in (result.bundle / "datasheet.md").read_text()


def _same_bytes(a, b, names):
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.mark.slow
def test_release_on_a_dask_local_cluster_equals_the_single_shard_run(released, tmp_path):
    """The release flow on a real Dask LocalCluster of 2 worker processes: generation and the memorization search
    are split into 2 shards, the utility classifiers are mapped, and the merged outputs are byte-identical to
    single-shard runs with the same seed and thread count."""
    import shutil

    from flows.release import release
    from flows.release_config import RunnerSettings
    from flows.runners import task_threads
    from flows.stages import generate_stage, guidance_stage
    from privacy.audit import audit_privacy
    from privacy.audit_config import PrivacyAuditConfig
    from reports.utility import UtilityConfig, audit_utility

    tmp, cfg, _ = released
    work = tmp_path / "work"
    (work / ".stages").mkdir(parents=True)
    for name in ("dataset", "validation", "model"):  # the trained generator is reused; everything after reruns
        shutil.copytree(tmp / "work" / name, work / name)
        shutil.copy(tmp / "work" / ".stages" / f"{name}.json", work / ".stages")
    dask_cfg = cfg.model_copy(update={
        "workdir": work, "releases_dir": tmp_path / "releases",
        "runner": RunnerSettings(kind="dask", workers=2, threads_per_worker=1),
    })
    result = release(config=dask_cfg)
    assert result.status == "published"
    assert verify_bundle(result.bundle, load_public_key(tmp / "keys" / "release.pub"))
    for stage in ("synthetic", "audit-privacy"):
        assert {p.name for p in work.glob(f"{stage}-shard-*")} == {f"{stage}-shard-0-of-2", f"{stage}-shard-1-of-2"}
    assert sorted(p.name for p in work.glob("audit-utility-job-*")) == ["audit-utility-job-augmentation-1",
                                                                         "audit-utility-job-trtr",
                                                                         "audit-utility-job-tstr"]
    with task_threads(dask_cfg.runner):  # the workers' torch and faiss thread count, in this process
        chosen = guidance_stage(dask_cfg, work / "dataset", work / "model")  # the run's choice, reused
        single = generate_stage(chosen.model_copy(update={"workdir": tmp_path / "single", "runner": cfg.runner}),
                                work / "model")
        audit = audit_privacy(work / "dataset", work / "synthetic", tmp_path / "audit", model_dir=work / "model",
                              config=PrivacyAuditConfig.model_validate(cfg.privacy_audit))
        utility = audit_utility(work / "dataset", work / "synthetic-released", tmp_path / "utility",
                                config=UtilityConfig.model_validate(cfg.utility_audit))
    assert _same_bytes(single, work / "synthetic", ["images.npy", "metadata.parquet"])
    assert load_dataset(work / "synthetic").content_hash == load_dataset(single).content_hash
    assert _same_bytes(audit, work / "audit-privacy", ["memorization.parquet", "holdout_distances.parquet"])
    merged_u = json.loads((work / "audit-utility" / "utility.json").read_text())
    single_u = json.loads((utility / "utility.json").read_text())
    for body in (merged_u, single_u):
        for key in ("timings", "created"):
            body.pop(key, None)
    assert merged_u == single_u


@pytest.mark.slow
def test_release_trains_with_two_processes_from_its_prefect_task(released, tmp_path):
    """`launch.nproc: 2` makes the release's train task launch torchrun (gloo here) instead of training
    in-process; the model directory is the usual one and records the world size."""
    import shutil

    from prefect import flow

    from flows.release import train_task
    from flows.release_config import LaunchSettings
    from synth.pipeline import read_model_card

    tmp, cfg, _ = released
    work = tmp_path / "work"
    (work / ".stages").mkdir(parents=True)
    shutil.copytree(tmp / "work" / "dataset", work / "dataset")
    two = cfg.model_copy(update={"workdir": work, "launch": LaunchSettings(nproc=2, backend="gloo"),
                                 "train": cfg.train.model_copy(update={"max_steps": 4, "checkpoint_every": None})})

    @flow(name="train-only")
    def train_only(c, dataset):
        return train_task(c, dataset)

    model = train_only(two, work / "dataset")
    card = read_model_card(model)
    assert card["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert card["steps"] == 4 and card["examples_seen"] > 0


def _check_standard_signature_and_marks(tmp, bundle, release_id):
    """The published bundle verifies with the OpenSSF reference tool (as the README documents) and fails once a
    byte changes; every released PNG says in its XMP that it is synthetic, and from which release."""
    import shutil
    import subprocess
    import sys

    from PIL import Image

    from reports.synthetic_mark import DIGITAL_SOURCE_TYPE

    pngs = sorted((bundle / "data").rglob("*.png"))
    assert pngs
    for path in pngs:
        with Image.open(path) as im:
            desc = im.getxmp()["xmpmeta"]["RDF"]["Description"]
        assert desc["DigitalSourceType"] == DIGITAL_SOURCE_TYPE and desc["ReleaseID"] == release_id
    copy = tmp / "tampered-copy"
    shutil.copytree(bundle, copy)
    victim = copy / pngs[0].relative_to(bundle)
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0x01
    victim.write_bytes(bytes(data))
    for target in (bundle, copy):
        out = subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(target),
                              "--signature", str(target / "release.sig"), "--public_key",
                              str(tmp / "keys" / "release.pub")], capture_output=True, text=True, timeout=300)
        assert (out.returncode == 0) == (target == bundle), out.stderr
    shutil.rmtree(copy)
