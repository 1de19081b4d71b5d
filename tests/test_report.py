"""`qstar report RUN`: the page's embedded data, bad input, runs in progress, sweeps, credit."""

from __future__ import annotations

import json
import re

import pytest
import torch
from report_runs import make_run
from tiny import build_tiny_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import pipeline.report.credit as credit_module
from critics.implicit import option_rewards
from pipeline.cli import main
from pipeline.compose import compose_config
from pipeline.config import ModelConfig
from pipeline.lm.models import embedded_gguf, load_model
from pipeline.lm.teacher_forced import completion_logprobs
from pipeline.loop import run_loop
from pipeline.report.collect import lock_holder, run_status, search_rows
from pipeline.report.credit import iteration_credit
from pipeline.report.inspect import LoopKind, iteration_rows, loop_kind
from pipeline.report.page import build_report, embed_json
from pipeline.run.store import RunStore, load_shards
from pipeline.stages.search import search_spread


def page_data(path) -> dict:
    text = path.read_text()
    found = re.search(r'<script type="application/json" id="qstar-data">(.*?)</script>', text, re.S)
    assert found, "no embedded data"
    return json.loads(found.group(1))


def the_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_report_prints_its_path_last_and_embeds_the_run(tmp_path, capsys):
    store = make_run(tmp_path / "run", trees=4, nodes=12)
    assert main(["report", str(store.root)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    page = store.root / "report.html"
    assert out[-1] == str(page) and page.is_file()
    data = page_data(page)
    run = data["runs"][0]
    assert run["status"]["complete"] and "complete" in run["status"]["message"]
    assert [row[0] for row in run["table"]] == ["policy", "0", "1"]
    assert run["table"][2][1] == "0.500"  # greedy accuracy of policy 1, as `qstar inspect` prints
    assert {p["name"] for p in run["plots"]} >= {"accuracy"}  # made when the run had none
    assert "beta: 0.1" in run["config"]
    (it,) = run["iterations"]
    assert [t["problem_id"] for t in it["trees"]] == ["p/0", "p/1", "p/2", "p/3"]
    source = [json.loads(line) for p in sorted((store.root / "iter_000/search").glob("*.jsonl"))
              for line in p.read_text().splitlines()]
    for tree, row in zip(it["trees"], source):
        assert len(tree["nodes"]) == 12 and tree["best"] == row["tree"]["best_trajectory"]
        assert [n["q"] for n in tree["nodes"]] == [n["q"] for n in row["tree"]["nodes"]]
        assert tree["rollouts"] == row["rollouts"] and tree["solved"] == row["solved"]
    dpo_lines = (store.root / "iter_000/data/dpo.jsonl").read_text().splitlines()
    assert len(it["dpo"]) == len(dpo_lines) > 0 and all("prompt" not in r for r in it["dpo"] + it["sft"])
    assert it["credit"] == {} and it["note"] == ""


def test_the_table_shows_the_critics_each_policy_was_evaluated_with(tmp_path):
    """Policy 1's critics: iteration 0's refit when it ran, else (a run from before the refit
    stage, still complete) its critics stage's."""
    store = make_run(tmp_path / "run", trees=4)
    header, _, policy_1 = iteration_rows(store)
    assert policy_1[header.index("orm_auc")] == "0.700" and policy_1[header.index("prm_auc")] == "0.650"
    del store.manifest["stages"]["iter_000/refit"]
    header, _, policy_1 = iteration_rows(store)
    assert policy_1[header.index("orm_auc")] == "0.600" and run_status(store)["complete"]


def test_the_table_shows_what_each_search_had_to_pair(tmp_path):
    """contrast and logp_tok come from the search stage's metrics; a run searched before they were
    recorded shows '-' rather than failing."""
    store = make_run(tmp_path / "run", trees=4)
    header, _, policy_1 = iteration_rows(store)
    assert policy_1[header.index("contrast")] == "-" and policy_1[header.index("logp_tok")] == "-"
    search = store.metrics(0, "search") | search_spread(load_shards(store.stage_dir(0, "search")))
    store.complete(0, "search", search, 1.0)
    header, _, policy_1 = iteration_rows(store)
    assert policy_1[header.index("contrast")] == str(search["contrast_problems"])
    assert policy_1[header.index("logp_tok")] == format(search["option_logp_per_token"], ".2f")


def test_page_loads_nothing_from_the_network(tmp_path):
    store = make_run(tmp_path / "run")
    text = build_report(store.root).read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert "data:image/png;base64," in text  # plots are inside the page


def test_text_that_looks_like_html_stays_text(tmp_path):
    payload = {"runs": [], "x": "</script><script>alert(1)</script><!--"}
    embedded = embed_json(payload)
    assert "<" not in embedded and json.loads(embedded) == payload


def test_not_a_directory_and_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such directory" in the_error(capsys)
    (tmp_path / "empty").mkdir()
    (tmp_path / "other" / "notes").mkdir(parents=True)
    assert main(["report", str(tmp_path / "other")]) == 2
    line = the_error(capsys)
    assert "neither a run nor a sweep" in line and "it holds: notes" in line
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "it holds: nothing" in the_error(capsys)


def test_missing_iteration_and_problem_name_what_exists(tmp_path, capsys):
    store = make_run(tmp_path / "run", trees=3)
    assert main(["report", str(store.root), "--iter", "4"]) == 2
    line = the_error(capsys)
    assert "iteration 4" in line and "searched iterations: 0" in line
    assert main(["report", str(store.root), "--iter", "0", "--problem", "p/9"]) == 2
    line = the_error(capsys)
    assert "'p/9'" in line and "p/0, p/1, p/2" in line
    assert not (store.root / "report.html").exists()
    assert main(["report", str(store.root), "--iter", "0", "--problem", "p/2"]) == 0
    assert page_data(store.root / "report.html")["open"] == {"iteration": 0, "problem": "p/2"}


def test_a_corrupt_shard_is_one_line_naming_file_and_line(tmp_path, capsys):
    store = make_run(tmp_path / "run")
    shard = store.root / "iter_000/search/shard_0001.jsonl"
    shard.write_text(shard.read_text() + "{not json\n")
    assert main(["report", str(store.root)]) == 2
    assert f"{shard}:3: not a JSON row" in the_error(capsys)


def test_a_stopped_run_shows_what_is_complete_and_says_so(tmp_path):
    # baseline and search done; critics onwards not; iteration 1 never started
    store = make_run(tmp_path / "run", trees=4, iterations=2, done_stages=2)
    data = page_data(build_report(store.root))
    status = data["runs"][0]["status"]
    assert not status["complete"] and not status["running"]
    assert "in progress (stopped" in status["message"] and "2 of 13 stages" in status["message"]
    assert "iter_000/critics" in status["message"]
    (it,) = data["runs"][0]["iterations"]
    assert len(it["trees"]) == 4 and it["dpo"] == [] and it["sft"] == []  # data stage not done
    assert [row[0] for row in data["runs"][0]["table"]] == ["policy", "0"]


def test_a_running_search_shows_the_shards_written_so_far(tmp_path):
    store = make_run(tmp_path / "run", trees=4, done_stages=1)  # baseline only
    (store.root / "iter_000/search/shard_0001.jsonl").unlink()  # the second shard not yet written
    with store.lock():
        assert lock_holder(store.root) is not None
        data = page_data(build_report(store.root))
    assert lock_holder(store.root) is None
    status = data["runs"][0]["status"]
    assert status["running"] and "running now" in status["message"]
    (it,) = data["runs"][0]["iterations"]
    assert not it["search_complete"] and len(it["trees"]) == 2
    assert "in progress" in it["note"] and "2 tree(s)" in it["note"]


def test_a_run_with_nothing_searched_yet(tmp_path):
    store = make_run(tmp_path / "run", done_stages=0)
    for shard in (store.root / "iter_000/search").glob("*.jsonl"):
        shard.unlink()
    data = page_data(build_report(store.root))
    assert data["runs"][0]["iterations"] == [] and data["runs"][0]["table"] == []
    assert "0 of 7 stages" in data["runs"][0]["status"]["message"]


def test_sweep_gets_one_section_per_run(tmp_path, capsys):
    make_run(tmp_path / "sweep" / "0", trees=2)
    make_run(tmp_path / "sweep" / "1", trees=3)
    (tmp_path / "sweep" / "multirun.yaml").write_text("x: 1\n")
    assert main(["report", str(tmp_path / "sweep")]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "sweep/report.html")
    data = page_data(tmp_path / "sweep" / "report.html")
    assert [r["name"] for r in data["runs"]] == ["0", "1"]
    assert [len(r["iterations"][0]["trees"]) for r in data["runs"]] == [2, 3]
    assert [row[0] for row in data["sweep"]] == ["run", "0", "1"]


def test_credit_without_a_policy_on_disk_says_why(tmp_path):
    store = make_run(tmp_path / "run", policy_dir=str(tmp_path / "gone"))
    data = page_data(build_report(store.root, credit="best"))
    (it,) = data["runs"][0]["iterations"]
    assert it["credit"] == {} and "not on disk" in it["credit_note"]


@pytest.fixture
def trained_run(tmp_path, tiny_model_dir):
    policy = build_tiny_model(tmp_path / "policy_1", seed=1)
    return make_run(tmp_path / "run", trees=2, nodes=6, policy_dir=str(policy),
                    model_name=str(tiny_model_dir))


def test_credit_maps_and_node_implicit_rewards_are_computed_once(trained_run, monkeypatch):
    data = page_data(build_report(trained_run.root, credit="all"))
    (it,) = data["runs"][0]["iterations"]
    assert sorted(it["credit"]) == ["p/0", "p/1"]
    for tree in it["trees"]:
        credit = it["credit"][tree["problem_id"]]
        assert "".join(credit["tokens"]) == tree["best_text"]  # one character per token here
        assert len(credit["rewards"]) == len(credit["tokens"])
        assert credit["total"] == pytest.approx(sum(credit["rewards"]))
        assert "implicit" not in tree["nodes"][0]  # the root has no option
        assert all(isinstance(n["implicit"], float) for n in tree["nodes"][1:])
    assert any(abs(r) > 1e-6 for c in it["credit"].values() for r in c["rewards"])
    assert (trained_run.root / "iter_000/credit.json").is_file()

    def no_models(*args, **kwargs):
        raise AssertionError("the cache covers these trees: no model may load")

    monkeypatch.setattr(credit_module, "load_model", no_models)
    again = page_data(build_report(trained_run.root, credit="best"))  # "all" covers "best"
    assert again["runs"][0]["iterations"][0]["credit"] == it["credit"]


def test_credit_best_rewards_the_best_path_only(trained_run):
    data = page_data(build_report(trained_run.root, credit="best"))
    for tree in data["runs"][0]["iterations"][0]["trees"]:
        rewarded = {n["id"] for n in tree["nodes"] if "implicit" in n}
        assert rewarded == set(tree["best"]) - {0} and rewarded


def test_node_implicit_reward_is_the_option_after_its_path(trained_run):
    """The per-node reward equals critics.implicit.option_rewards along the node's path."""
    rows = search_rows(trained_run, 0)
    result = iteration_credit(trained_run, 0, rows, "all")
    policy, tokenizer = load_model(ModelConfig(name=trained_run.metrics(0, "train")["policy_dir"]))
    reference, _ = load_model(ModelConfig(name=trained_run.manifest["config"]["model"]["name"]))
    row = rows[0]
    nodes = row["tree"]["nodes"]
    leaf = max(range(len(nodes)), key=lambda n: nodes[n]["depth"])
    path = [leaf]
    while nodes[path[0]]["parent"] > 0:
        path.insert(0, nodes[path[0]]["parent"])
    expected = option_rewards(policy, reference, tokenizer, row["prompt"],
                              [nodes[i]["text"] for i in path], 0.1, completion_logprobs)
    got = [result["nodes"][row["problem_id"]][str(i)] for i in path]
    assert got == pytest.approx(expected, abs=1e-5)


def test_report_on_a_real_tiny_run(tmp_path, debug_overrides):
    """End to end: a 1-iteration run of the loop on the tiny model, then its report."""
    run_loop(compose_config(debug_overrides + ["search.trees_per_batch=2"]), tmp_path / "run")
    data = page_data(build_report(tmp_path / "run"))
    run = data["runs"][0]
    assert run["status"]["complete"]
    store = RunStore(tmp_path / "run")
    assert len(run["iterations"][0]["trees"]) == store.metrics(0, "search")["problems"]
    assert len(run["iterations"][0]["dpo"]) == store.metrics(0, "data")["dpo"]


@pytest.fixture(scope="module")
def smollm2_pair(tmp_path_factory):
    """Two tiny random Llamas (seeds 0, 1) with SmolLM2's real BPE tokenizer (from its GGUF)."""
    gguf = embedded_gguf("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    root = tmp_path_factory.mktemp("smol-tok")
    paths = []
    for seed in (0, 1):
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                             pad_token_id=tokenizer.pad_token_id or 0,
                             eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(root / f"m{seed}")
        tokenizer.save_pretrained(root / f"m{seed}")
        paths.append(root / f"m{seed}")
    return tokenizer, paths


def test_credit_tokens_follow_smollm2_bpe(smollm2_pair, tmp_path):
    tokenizer, (base, policy) = smollm2_pair
    store = make_run(tmp_path / "run", trees=3, nodes=8, policy_dir=str(policy),
                     model_name=str(base))
    data = page_data(build_report(store.root, credit="best"))
    (it,) = data["runs"][0]["iterations"]
    texts = {t["problem_id"]: t["best_text"] for t in it["trees"]}
    assert any("\n\n" in text for text in texts.values())
    for pid, credit in it["credit"].items():
        ids = tokenizer(texts[pid], add_special_tokens=False).input_ids
        assert len(credit["tokens"]) == len(credit["rewards"]) == len(ids)
        assert "".join(credit["tokens"]) == texts[pid]  # spans cover the text exactly
    double = tokenizer("\n\n", add_special_tokens=False).input_ids
    assert len(double) == 1  # the boundary the per-character test tokenizer hides
    assert any(tok == "\n\n" for c in it["credit"].values() for tok in c["tokens"])


def test_usage_lists_report(capsys):
    assert main(["--help"]) == 0
    assert "qstar report RUN" in capsys.readouterr().out


@pytest.mark.parametrize("config, kind", [
    ({"train": {"mode": "dpo_then_sft"}, "search": {"algorithm": "mcts"}}, LoopKind.mcts),
    ({"train": {"mode": "sft"}, "search": {"algorithm": "sample"}}, LoopKind.star),
    ({"train": {"mode": "grpo"}, "search": {"algorithm": "mcts"}}, LoopKind.grpo),
    ({}, LoopKind.mcts),  # a manifest from before the config was recorded
])
def test_loop_kind_reads_the_recorded_config(tmp_path, config, kind):
    store = RunStore(tmp_path / "run")
    store.set_info(iterations=1, config=config)
    assert loop_kind(RunStore(tmp_path / "run")) is kind
