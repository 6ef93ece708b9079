#!/usr/bin/python3
"""A plain PyTorch training loop of the same Llama models and work as `strata bench train`.

The peer of Strata's C++ trainer for issue 20: Debian's python3-torch (the same libtorch1.13 and
OpenBLAS underneath), a textbook Llama (RMSNorm, rotate_half RoPE, grouped-query attention with an
additive causal mask, SwiGLU, tied lm_head), torch.optim.AdamW, random token ids (batch x seq, every
position after the first a target), fp32. Methods: "full" (every parameter trains) and "lora" (rank
8, alpha 16 on every q/k/v/o/gate/up/down projection; the base is frozen). Prints the median step
time and tokens/s over the timed steps, and the fp32 GEMM rate (1024^3 torch.mm, median of 10).

  /usr/bin/python3 bench/python_train_loop.py --model stories260K --method lora --batch 16 --seq 256
  /usr/bin/python3 bench/python_train_loop.py --model 110m --method full --batch 8 --seq 256 --steps 3

Use /usr/bin/python3 (Debian's torch is not on a pyenv python). Threads: --threads (default 2);
run with OMP_WAIT_POLICY=PASSIVE like the C++ benches. glibc returns large freed blocks to the OS
(mmap); MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1 in the environment turns that off.
"""

import argparse
import json
import math
import os
import statistics
import struct
import time

import torch
import torch.nn.functional as F
from torch import nn

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")


def llama_110m():
    return dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                num_key_value_heads=12, head_dim=64, vocab_size=32000, rms_norm_eps=1e-5,
                rope_theta=10000.0)


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", info["dtype"]
        a, b = info["data_offsets"]
        out[name] = torch.frombuffer(bytearray(data[a:b]), dtype=torch.float32).view(info["shape"])
    return out


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class LoraLinear(nn.Module):
    """y = x Wᵀ + s·(x Aᵀ) Bᵀ, PEFT's init (A kaiming-uniform, B = 0)."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.empty(rank, base.in_features).uniform_(
            -1 / math.sqrt(base.in_features), 1 / math.sqrt(base.in_features)))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scaling = alpha / rank

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a) * self.scaling, self.b)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


class Layer(nn.Module):
    def __init__(self, c):
        super().__init__()
        h, hd = c["hidden_size"], c["head_dim"]
        self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], c["num_key_value_heads"], hd
        self.input_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(h, c["rms_norm_eps"])
        self.q_proj = nn.Linear(h, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=False)
        self.gate_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(h, c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], h, bias=False)

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        n = self.input_layernorm(x)
        q = self.q_proj(n).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(n).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(n).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim) + mask
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + self.o_proj(out)
        n = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))


class Llama(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList([Layer(c) for _ in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        hd = c["head_dim"]
        self.register_buffer("inv_freq", 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)))

    def forward(self, ids):
        b, t = ids.shape
        ang = torch.arange(t).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((ang, ang), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        mask = torch.full((t, t), float("-inf")).triu(1)
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return F.linear(self.norm(x), self.embed_tokens.weight)


def gemm_gflops():
    x, y = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        torch.mm(x, y)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        torch.mm(x, y)
        times.append(time.perf_counter() - t0)
    return 2 * 1024 ** 3 / statistics.median(times) / 1e9


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="stories260K", choices=["stories260K", "110m"])
    p.add_argument("--method", default="lora", choices=["lora", "full"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.model == "stories260K":
        d = os.path.join(SHARED, "models", "stories260K")
        with open(os.path.join(d, "config.json")) as f:
            c = json.load(f)
        c.setdefault("head_dim", c["hidden_size"] // c["num_attention_heads"])
        c.setdefault("rope_theta", 10000.0)
        model = Llama(c)
        tensors = load_safetensors(os.path.join(d, "model.safetensors"))
        state = {k[len("model."):].replace("self_attn.", "").replace("mlp.", ""): v for k, v in tensors.items()}
        missing, _ = model.load_state_dict(state, strict=False)
        assert missing == ["inv_freq"], missing
    else:
        c = llama_110m()
        model = Llama(c)
        with torch.no_grad():
            for name, prm in model.named_parameters():
                if name.endswith("norm.weight"):
                    prm.fill_(1.0)
                else:
                    prm.normal_(0.0, 0.02)

    if args.method == "lora":
        for prm in model.parameters():
            prm.requires_grad_(False)
        for layer in model.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                setattr(layer, name, LoraLinear(getattr(layer, name), args.rank, args.alpha))
    params = [prm for prm in model.parameters() if prm.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    matmul_params = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, nn.Linear))
    matmul_params += model.embed_tokens.weight.numel()  # the tied lm_head
    trainable = sum(prm.numel() for prm in params)

    gen = torch.Generator().manual_seed(1)
    vocab = c["vocab_size"]
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen)
        t0 = time.perf_counter()
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    flops = (4 * matmul_params + 2 * min(trainable, matmul_params)) * tokens
    gemm = gemm_gflops()
    print(json.dumps({
        "model": args.model, "method": args.method, "batch": args.batch, "seq": args.seq,
        "threads": torch.get_num_threads(), "trainable": trainable, "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1), "gflops": round(flops / step_s / 1e9, 1),
        "gemm_gflops": round(gemm, 1), "pct_gemm": round(100 * flops / step_s / 1e9 / gemm, 1),
        "load1": os.getloadavg()[0], "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
    }))


if __name__ == "__main__":
    main()
