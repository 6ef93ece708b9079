#!/usr/bin/env python3
"""Writes small seed corpora for the fuzz targets, derived at run time from ../shared (nothing from
shared/ is stored in the repository). Usage: make_seeds.py SHARED_DIR OUT_DIR"""
import json
import os
import struct
import sys

shared, out = sys.argv[1], sys.argv[2]


def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def head_lines(path, n):
    with open(path, "rb") as f:
        return b"".join(f.readline() for _ in range(n))


# JSONL validator: the service's own format and the benchmark records, under several modes.
for kind in ("cl-small", "cl"):
    base = os.path.join(shared, "data", kind)
    for task in sorted(os.listdir(base)):
        for split in ("train.jsonl", "test.jsonl"):
            p = os.path.join(base, task, split)
            if os.path.exists(p):
                lines = head_lines(p, 12 if kind == "cl-small" else 3)
                for mode in (0x00, 0x05, 0x3A):
                    put("fuzz_jsonl", f"{kind}-{task}-{split}-{mode:02x}", bytes([mode]) + lines)

# safetensors: the real headers of the shared models, re-laid over a small data buffer (the first
# tensors that fit in 4 KiB), so that the seeds are valid files.
for model in ("stories260K", "stories260K-bf16", "stories260K-qwen2"):
    p = os.path.join(shared, "models", model, "model.safetensors")
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    small, offset = {}, 0
    if "__metadata__" in header:
        small["__metadata__"] = header.pop("__metadata__")
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        size = e["data_offsets"][1] - e["data_offsets"][0]
        if offset + size > 4096:
            continue
        small[name] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(small).encode()
    text += b" " * (-len(text) % 8)
    put("fuzz_safetensors_header", model, struct.pack("<Q", len(text)) + text + bytes(offset))
put("fuzz_safetensors_header", "empty", struct.pack("<Q", 2) + b"{}")

# config.json of the shared models.
for model in ("stories260K", "stories260K-bf16", "stories260K-qwen2"):
    with open(os.path.join(shared, "models", model, "config.json"), "rb") as f:
        put("fuzz_model_config", model, f.read())

# tokenizer.json: the small stories260K one whole; the production ones with their vocab and merges
# cut down (normalizer, pre-tokenizer regexes, added tokens, post-processor and decoder kept).
with open(os.path.join(shared, "models", "stories260K", "tokenizer.json"), "rb") as f:
    put("fuzz_tokenizer_load", "stories260K", f.read())
for tok in ("gpt2", "llama2", "llama3", "qwen3", "mistral"):
    with open(os.path.join(shared, "tokenizers", tok, "tokenizer.json"), encoding="utf-8") as f:
        j = json.load(f)
    model = j.get("model", {})
    vocab = model.get("vocab", {})
    keep = dict(sorted(vocab.items(), key=lambda kv: kv[1])[:300])
    model["vocab"] = keep
    merges = []
    for m in model.get("merges", []):
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if a in keep and b in keep and (a + b) in keep:
            merges.append(m)
    model["merges"] = merges[:200]
    j["added_tokens"] = [t for t in j.get("added_tokens", []) if t.get("id", 0) < 300][:20]
    put("fuzz_tokenizer_load", tok, json.dumps(j, ensure_ascii=False))

# Tokenizer encoding: the shared test vectors, for each tokenizer (byte 0 picks it: 0 byte-level,
# 1 stories260K, 2 gpt2, 3 llama2, 4 llama3, 5 qwen3, 6 mistral).
for vec, pick in (("gpt-2", 2), ("llama-spm", 3), ("llama-bpe", 4), ("qwen2", 5)):
    with open(os.path.join(shared, "tokenizers", "testvectors", f"ggml-vocab-{vec}.gguf.inp"), "rb") as f:
        cases = f.read().split(b"\n__ggml_vocab_test__\n")
    for i, case in enumerate(cases):
        for sel in (pick, pick + 0x40):
            put("fuzz_tokenizer_encode", f"{vec}-{i}-{sel:02x}", bytes([sel]) + case)

# PEFT adapter_config.json as PEFT writes it.
peft = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "rank_pattern": {}, "alpha_pattern": {"model.layers.0.self_attn.q_proj": 32}, "task_type": "CAUSAL_LM"}
put("fuzz_peft_config", "lora", json.dumps(peft, indent=2))
peft.update({"target_modules": "all-linear", "use_rslora": True, "alpha_pattern": {}})
put("fuzz_peft_config", "rslora", json.dumps(peft))

# job.json as the journal writes it.
job = {"format": "strata.job.v1", "id": "job-000001", "sequence": 1,
       "spec": {"name": "capitals", "method": "", "overrides": {"rank": 8, "learning_rate": 0.005},
                "eval_fraction": 0.1, "eval_cap": 200, "scorer": "exact_match", "description": "d"},
       "state": "succeeded", "created": 1.7e9, "started": 1.7e9, "finished": 1.7e9,
       "train_examples": 207, "eval_examples": 23,
       "progress": {"step": 300, "total_steps": 300, "epoch": 2, "loss": 0.5, "learning_rate": 0.001,
                    "tokens_per_second": 1000.0, "eta_seconds": 0.0},
       "error": "", "eval_results": [{"task": "capitals", "score": 0.9}], "weights_version": 2,
       "reference_nll": 2.1, "attempts": 1}
put("fuzz_job_json", "succeeded", json.dumps(job, indent=1))
job.update({"state": "queued", "eval_results": [], "attempts": 0})
put("fuzz_job_json", "queued", json.dumps(job))


# SubmitTask streams: [u16 length][SubmitTaskRequest] messages, hand-encoded protobuf wire format.
def varint(n):
    b = bytearray()
    while True:
        x = n & 0x7F
        n >>= 7
        b.append(x | (0x80 if n else 0))
        if not n:
            return bytes(b)


def field(num, payload):
    if isinstance(payload, str):
        payload = payload.encode()
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def frame(msg):
    return struct.pack("<H", len(msg)) + msg


spec = field(1, field(1, "capitals") + field(7, "country -> capital"))
with open(os.path.join(shared, "data", "cl-small", "capitals", "train.jsonl"), "rb") as f:
    lines = [f.readline() for _ in range(6)]
put("fuzz_submit_task", "jsonl", frame(spec) + frame(field(2, field(1, b"".join(lines[:3])))) +
    frame(field(2, field(1, b"".join(lines[3:])))))
examples = b""
for line in lines:
    e = json.loads(line)
    examples += field(2, field(1, e["prompt"]) + field(2, e["completion"]))
put("fuzz_submit_task", "structured", frame(spec) + frame(field(2, examples)) +
    frame(field(3, field(2, field(1, "Q") + field(2, " A")))))
with open(os.path.join(shared, "data", "cl-small", "langid", "train.jsonl"), "rb") as f:
    e = json.loads(f.readline())
choice = field(1, e["prompt"]) + field(2, e["completion"]) + b"".join(field(3, c) for c in e.get("choices", []))
put("fuzz_submit_task", "choice", frame(field(1, field(1, "langid") + varint(6 << 3) + varint(1))) +
    frame(field(2, field(1, b'{"prompt": "x", "compl') + field(2, choice))))
