from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from selm_data import ManifestError, load_manifest
from selm_data.manifest import find_manifest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "manifests").rglob("*.yaml"))


def test_every_shipped_manifest_is_found_and_validates():
    names = {p.stem for p in SHIPPED}
    assert {"demo", "zephyr-7b-selm", "zephyr-7b-iterative-dpo", "llama3-8b-selm",
            "llama3-8b-iterative-dpo"} <= names
    for path in SHIPPED:
        m = load_manifest(path)
        assert m.name == path.stem
        for t in range(1, len(m.iterations) + 1):
            m.train_for(t)


def test_paper_hyperparameters():
    zephyr = load_manifest(REPO / "manifests/zephyr-7b-selm.yaml")
    plan = [zephyr.train_for(t) for t in range(1, 5)]
    assert [p.loss for p in plan] == ["dpo", "selm", "selm", "selm"]
    assert [p.learning_rate for p in plan] == [5e-7, 5e-7, 5e-7, 1e-7]
    assert [p.alpha for p in plan] == [0.0, 1e-3, 1e-3, 1e-3]
    assert zephyr.iteration(1).pairs == "original"
    assert {p.beta for p in plan} == {0.01} and plan[0].global_batch_size == 256
    llama = load_manifest(REPO / "manifests/llama3-8b-selm.yaml")
    plan = [llama.train_for(t) for t in range(1, 4)]
    assert [p.learning_rate for p in plan] == [5e-7, 3e-7, 1e-7]
    assert {p.alpha for p in plan} == {1e-4} and plan[0].global_batch_size == 128
    for dpo in ("zephyr-7b-iterative-dpo", "llama3-8b-iterative-dpo"):
        m = load_manifest(REPO / f"manifests/{dpo}.yaml")
        assert {m.train_for(t).alpha for t in range(1, len(m.iterations) + 1)} == {0.0}
    for m in (zephyr, llama):
        t = m.train
        assert (t.max_length, t.max_prompt_length, t.warmup_ratio, t.epochs) == (1024, 512, 0.1, 1)
        assert t.lr_scheduler == "cosine"
        assert (m.generation.temperature, m.generation.top_p, m.generation.max_tokens) == (
            0.0, 1.0, 1024)


def write(tmp_path: Path, data: dict, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def demo() -> dict:
    return yaml.safe_load((REPO / "manifests/demo.yaml").read_text(encoding="utf-8"))


def test_unknown_field_is_named_with_the_allowed_ones(tmp_path, demo):
    demo["generation"]["temprature"] = 0.7
    path = write(tmp_path, demo)
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    message = str(e.value)
    assert str(path) in message
    assert "generation.temprature: unknown field" in message
    assert "temperature" in message and "top_p" in message  # what is allowed there


def test_unknown_field_inside_a_list_item(tmp_path, demo):
    demo["iterations"][1]["lr"] = 1e-7
    with pytest.raises(ManifestError, match=r"iterations\.1\.lr: unknown field; allowed here: "
                                            r"alpha, beta, learning_rate, loss, pairs"):
        load_manifest(write(tmp_path, demo))


def test_bad_choice_lists_the_allowed_values(tmp_path, demo):
    demo["generation"]["backend"] = "tgi"
    with pytest.raises(ManifestError, match=r"generation\.backend: Input should be 'vllm', "
                                            r"'transformers' or 'openai'"):
        load_manifest(write(tmp_path, demo))


def test_missing_field_is_named(tmp_path, demo):
    del demo["policy"]
    with pytest.raises(ManifestError, match=r"policy: required field is missing"):
        load_manifest(write(tmp_path, demo))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["train"].update(loss="dpo"), r"train: alpha applies to loss 'selm' only"),
        (lambda m: m["iterations"][0].update(loss="dpo"),
         r"alpha applies to loss 'selm' only"),
        (lambda m: m["train"].update(max_prompt_length=600),
         r"max_prompt_length must be below max_length"),
        (lambda m: m["generation"].update(n=4), r"n > 1 with temperature 0"),
        (lambda m: m["generation"].update(backend="openai"), r"needs a 'server'"),
        (lambda m: m["source"].update(hub="org/data"), r"exactly one of hub, path, bundled"),
        (lambda m: m["source"].update(bundled="nope.jsonl"), r"no bundled dataset 'nope.jsonl'"),
        (lambda m: m.update(portions={"count": 1}), r"portions.count \(1\) is below"),
        (lambda m: m["train"].update(beta=0), r"train\.beta: Input should be greater than 0"),
        (lambda m: m.update(iterations=[]), r"iterations: List should have at least 1 item"),
        (lambda m: m.update(iterations=True), r"iterations: Input should be a valid list"),
        (lambda m: m["source"].update(bundled="../manifest.py"), r"no bundled dataset"),
        (lambda m: m["source"].update(revision="main"), r"revision applies to a Hub dataset"),
        (lambda m: m["source"].update(limit=1), r"source.limit \(1\) leaves some of the 2"),
        (lambda m: m["generation"].update(server={"base_url": "http://127.0.0.1:8000/v1"}),
         r"generation: backend 'openai' needs a 'server', and only it uses one"),
        (lambda m: m["ranker"].update(server={"base_url": "http://127.0.0.1:8000/v1"}),
         r"ranker: ranker kind 'judge' needs a 'server', and only it uses one"),
        (lambda m: m.update(name=""), r"name: String should have at least 1 character"),
        (lambda m: m["policy"].update(trust_remote_code="yes"),
         r"policy\.trust_remote_code: Input should be a valid boolean"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(tmp_path, demo, edit, message):
    edit(demo)
    with pytest.raises(ManifestError, match=message):
        load_manifest(write(tmp_path, demo))


def test_an_iteration_that_resolves_to_bad_settings_is_named(tmp_path, demo):
    demo["iterations"][1]["loss"] = "dpo"  # while train.alpha > 0
    with pytest.raises(ManifestError, match=r"iteration 2 \(iterations\.1\) with train: alpha "
                                            r"applies to loss 'selm' only"):
        load_manifest(write(tmp_path, demo))


def test_numbers_yaml_reads_as_strings_still_load(tmp_path, demo):
    demo["train"]["learning_rate"] = "5e-7"  # what PyYAML makes of `learning_rate: 5e-7`
    assert load_manifest(write(tmp_path, demo)).train.learning_rate == 5e-7


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstore: [unclosed\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"broken\.yaml: not valid YAML at line 3"):
        load_manifest(path)


def test_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="a manifest is a mapping"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        load_manifest(tmp_path / "absent.yaml")


def test_iterations_shorthand(tmp_path, demo):
    demo["iterations"] = 3
    m = load_manifest(write(tmp_path, demo))
    assert len(m.iterations) == 3 and m.num_portions == 3
    assert m.train_for(3).learning_rate == demo["train"]["learning_rate"]


def test_hash_ignores_formatting_and_follows_content(tmp_path, demo):
    base = load_manifest(REPO / "manifests/demo.yaml").hash()
    reordered = dict(reversed(list(demo.items())))
    assert load_manifest(write(tmp_path, reordered, "r.yaml")).hash() == base
    demo["train"]["beta"] = 0.02
    assert load_manifest(write(tmp_path, demo, "b.yaml")).hash() != base


def test_find_manifest_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SELM_MANIFEST", raising=False)
    with pytest.raises(ManifestError, match="no manifest given"):
        find_manifest()
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests/demo.yaml").write_text("x", encoding="utf-8")
    assert find_manifest() == Path("manifests/demo.yaml")
    (tmp_path / "selm.yaml").write_text("x", encoding="utf-8")
    assert find_manifest() == Path("selm.yaml")
    monkeypatch.setenv("SELM_MANIFEST", "elsewhere.yaml")
    assert find_manifest() == Path("elsewhere.yaml")
    assert find_manifest("given.yaml") == Path("given.yaml")
