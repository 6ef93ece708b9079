#!/usr/bin/python3
"""Writes one set of Llama weights in two layouts, so Strata and llama2.c decode the same weights.

  # The random 110M config of the benches (N(0, 0.02), norms at 1, tied), as an HF directory for
  # Strata (config.json + model.safetensors) and a llama2.c checkpoint (legacy version-0 .bin):
  /usr/bin/python3 bench/export_llama2c.py --random-110m --hf-out /tmp/llama110m --bin-out /tmp/llama110m.bin
  # An existing HF directory (float32 safetensors, e.g. ../shared/models/stories260K) to a .bin:
  /usr/bin/python3 bench/export_llama2c.py --hf-in ../shared/models/stories260K --bin-out /tmp/s260k.bin

The HF layout permutes q/k rows for rotate_half RoPE; llama2.c rotates interleaved pairs, so q/k
are permuted back (llama2.c's export.py convention) and both programs compute the same model.
Needs only python3 + numpy (no torch).
"""

import argparse
import json
import os
import struct

import numpy as np


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype=np.float32).reshape(info["shape"])
    return out


def write_safetensors(path, tensors):
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(np.ascontiguousarray(t, dtype=np.float32).tobytes())


def unpermute(w, heads):
    # Inverse of HF's permute(w) = w.view(h, rows/h/2, 2, cols).transpose(1, 2).reshape(rows, cols).
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def write_llama2c(path, c, t):
    layers, heads, kv = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    tied = "lm_head.weight" not in t
    vocab = c["vocab_size"]
    seq = c.get("max_position_embeddings", 2048)
    hd = c["hidden_size"] // heads
    with open(path, "wb") as f:
        f.write(struct.pack("iiiiiii", c["hidden_size"], c["intermediate_size"], layers, heads, kv,
                            vocab if tied else -vocab, seq))

        def put(a):
            f.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())

        L = lambda i, n: t[f"model.layers.{i}.{n}"]
        put(t["model.embed_tokens.weight"])
        for i in range(layers):
            put(L(i, "input_layernorm.weight"))
        for i in range(layers):
            put(unpermute(L(i, "self_attn.q_proj.weight"), heads))
        for i in range(layers):
            put(unpermute(L(i, "self_attn.k_proj.weight"), kv))
        for name in ("self_attn.v_proj", "self_attn.o_proj"):
            for i in range(layers):
                put(L(i, name + ".weight"))
        for i in range(layers):
            put(L(i, "post_attention_layernorm.weight"))
        for name in ("mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"):  # llama2.c's w1, w2, w3
            for i in range(layers):
                put(L(i, name + ".weight"))
        put(t["model.norm.weight"])
        put(np.zeros(seq * hd, dtype=np.float32))  # the unused freq_cis_real / freq_cis_imag
        if not tied:
            put(t["lm_head.weight"])


def random_110m(seed):
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 768,
         "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
         "num_key_value_heads": 12, "head_dim": 64, "vocab_size": 32000, "max_position_embeddings": 2048,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1,
         "eos_token_id": 2, "torch_dtype": "float32"}
    rng = np.random.default_rng(seed)
    h, f = c["hidden_size"], c["intermediate_size"]
    t = {"model.embed_tokens.weight": rng.normal(0, 0.02, (c["vocab_size"], h)).astype(np.float32)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for n, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)), ("self_attn.v_proj", (h, h)),
                         ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)),
                         ("mlp.down_proj", (h, f))):
            t[p + n + ".weight"] = rng.normal(0, 0.02, shape).astype(np.float32)
        t[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
    t["model.norm.weight"] = np.ones(h, np.float32)
    return c, t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hf-in")
    p.add_argument("--random-110m", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--hf-out")
    p.add_argument("--bin-out", required=True)
    a = p.parse_args()
    if a.random_110m:
        c, t = random_110m(a.seed)
    else:
        with open(os.path.join(a.hf_in, "config.json")) as f:
            c = json.load(f)
        t = read_safetensors(os.path.join(a.hf_in, "model.safetensors"))
    if a.hf_out:
        os.makedirs(a.hf_out, exist_ok=True)
        with open(os.path.join(a.hf_out, "config.json"), "w") as f:
            json.dump(c, f, indent=2)
        write_safetensors(os.path.join(a.hf_out, "model.safetensors"), t)
    write_llama2c(a.bin_out, c, t)


if __name__ == "__main__":
    main()
