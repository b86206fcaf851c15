"""The decoding bench's CPU dry run (--tiny) goes through every decoder and writes its results, so a GPU
call is not spent on a bench that cannot start."""

import json

from bench import decode_bench
from tests.test_generation import PROMPTS


def test_tiny_dry_run_measures_every_decoder_against_one_at_a_time(tmp_path, real_tokenizer, monkeypatch):
    steps = []  # the lean_step each graph-decoded run asked for: graph_model_step passes False through generate
    real = decode_bench.graph_decode.greedy_tokens
    monkeypatch.setattr(decode_bench.graph_decode, "greedy_tokens",
                        lambda *a, **kw: steps.append(kw["lean_step"]) or real(*a, **kw))
    data = tmp_path / "validation.jsonl"  # processed records as the bench reads them: a prompt each
    data.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)), encoding="utf-8")
    before = decode_bench.common.BENCHMARKS_MD.read_text(encoding="utf-8")
    planned = decode_bench.graph_decode.BUCKET_COST_SLOTS
    path = decode_bench.main(["--tiny", "--data", str(data), "--out", str(tmp_path / "out"), "--max-new-tokens", "6",
                              "--sequential", "3", "--batch-size", "5", "--repeats", "1",
                              "--bucket-costs", "0", "1000000"])
    doc = json.loads(path.read_text(encoding="utf-8"))
    rows = {r["decoder"] + ("_ref" if r["name"].endswith("one_at_a_time") else "") + str(r["bucket_cost"] or ""): r
            for r in doc["results"]}
    assert set(rows) == {"generate_ref", "generate", "graph", "graph1000000", "graph_model_step",
                         "graph_model_step1000000", "generate_batch"}
    assert all(r["error"] is None and r["examples_per_s"] > 0 for r in rows.values()), rows
    assert rows["graph"]["examples"] == 5 and doc["reference_indices"] == [0, 2, 4]
    # fp32 on a CPU: batched, graph-decoded and continuous-batched outputs equal one-at-a-time ones
    assert rows["graph"]["identical"] == "3/3" and rows["graph"]["same_as_generate"] == "5/5"
    assert rows["generate_batch"]["identical"] == "3/3"
    # the graph decoder with the model's own step (the lean step's baseline) gives the same tokens
    assert rows["graph_model_step"]["same_as_generate"] == "5/5"
    assert set(steps) == {None, False}, steps
    # bucket cost 0: no padding is worth a bucket, so prompts of different lengths part; a huge one: one bucket
    assert rows["graph"]["buckets"] > 1 and rows["graph1000000"]["buckets"] == 1
    assert rows["graph1000000"]["same_as_generate"] == "5/5"
    assert decode_bench.graph_decode.BUCKET_COST_SLOTS == planned  # the bench put the planner's constant back
    assert decode_bench.common.BENCHMARKS_MD.read_text(encoding="utf-8") == before  # a dry run adds no table


def test_each_attention_of_the_lean_step_gets_its_own_graph_run(tmp_path, real_tokenizer, monkeypatch):
    asked = []  # the attention each lean step was built with
    real = decode_bench.gemma3_step.Gemma3Step.__init__
    monkeypatch.setattr(decode_bench.gemma3_step.Gemma3Step, "__init__",
                        lambda self, model, attention="matmul": asked.append(attention) or real(self, model, attention))
    data = tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)), encoding="utf-8")
    path = decode_bench.main(["--tiny", "--data", str(data), "--out", str(tmp_path / "out"), "--max-new-tokens", "4",
                              "--sequential", "2", "--batch-size", "5", "--repeats", "1", "--decoders", "graph",
                              "--attentions", "matmul", "matmul_tf32", "sdpa"])
    rows = {r.get("attention"): r for r in json.loads(path.read_text(encoding="utf-8"))["results"]}
    assert set(rows) == {None, "matmul", "matmul_tf32", "sdpa"}  # None: the one-at-a-time reference
    assert all(r["identical"] == "2/2" for r in rows.values()), rows
    assert {"matmul", "matmul_tf32", "sdpa"} <= set(asked)
    assert decode_bench.graph_decode.STEP_ATTENTION == "matmul_tf32"  # put back


def test_each_prefill_chunk_cost_gets_its_own_graph_run(tmp_path, real_tokenizer, monkeypatch):
    seen = []  # the chunk cost each bucket's prefill planned with
    real = decode_bench.graph_decode.BucketDecoder.prefill_chunks
    monkeypatch.setattr(decode_bench.graph_decode.BucketDecoder, "prefill_chunks",
                        lambda self: seen.append(decode_bench.graph_decode.PREFILL_CHUNK_SLOTS) or real(self))
    data = tmp_path / "validation.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)), encoding="utf-8")
    path = decode_bench.main(["--tiny", "--data", str(data), "--out", str(tmp_path / "out"), "--max-new-tokens", "4",
                              "--sequential", "2", "--batch-size", "5", "--repeats", "1", "--decoders", "graph",
                              "--prefill-chunks", "0", "1"])
    rows = {r.get("prefill_chunk"): r for r in json.loads(path.read_text(encoding="utf-8"))["results"]}
    assert set(rows) == {None, 0, 1} and all(r["identical"] == "2/2" for r in rows.values()), rows
    assert {0, 1} <= set(seen)
    assert decode_bench.graph_decode.PREFILL_CHUNK_SLOTS == 4096  # put back


def test_reference_prompts_spread_over_the_data():
    assert decode_bench.sample_indices(500, 50)[:3] == [0, 10, 20] and decode_bench.sample_indices(500, 50)[-1] == 499
    assert len(decode_bench.sample_indices(500, 50)) == 50
    assert decode_bench.sample_indices(3, 50) == [0, 1, 2]
