#!/usr/bin/env python3
"""A small decoder-only Transformer (PyTorch) whose attention layers run on attnserve sessions.

The model (random weights, seeded) has a few pre-norm blocks of nn.MultiheadAttention and an MLP. Its
attention weights are saved to one safetensors file, served by attnserve as layers dec0, dec1, ..., and the
model generates greedily with one session over all of them: the prompt goes in one append per layer
(prefill), then each new token in one append per layer (decode); the server keeps every layer's keys and
values, so each step sends one token, not the whole prefix. The same model run locally on the whole sequence
at every step must give the same logits (1e-4) and the same tokens.

    python3 -m venv --system-site-packages venv && venv/bin/pip install --no-index --no-build-isolation client/python
    venv/bin/python examples/python/remote_decoder.py --attnserve build/server/attnserve   # starts a server
    venv/bin/python examples/python/remote_decoder.py --target HOST:PORT --weights-out DIR # a server of yours

Without --attnserve it writes the weights and a config to --weights-out and expects a server started with
that config at --target; if that server was started with --auth-token-file, give the token with --token-file
FILE (its first line) or $ATTNSERVE_TOKEN. Exits 0 when every step matches, 1 otherwise.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

import attnserve
from attnserve.torch import save_attention_layers


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))


class Decoder(nn.Module):
    def __init__(self, vocab, dim, heads, layers, max_len):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def embed(self, tokens, start):
        return self.tok(tokens) + self.pos(torch.arange(start, start + len(tokens)))

    def forward_local(self, tokens):
        """Logits [n, vocab] of the whole sequence, causal attention computed here."""
        x = self.embed(tokens, 0)[None]
        causal = torch.triu(torch.ones(len(tokens), len(tokens), dtype=torch.bool), diagonal=1)
        for b in self.blocks:
            h = b.ln1(x)
            x = x + b.attn(h, h, h, attn_mask=causal, need_weights=False)[0]
            x = x + b.mlp(b.ln2(x))
        return self.head(self.ln_f(x))[0]

    def forward_session(self, session, tokens, start):
        """Logits of `tokens` (positions start...), attention on the server: each layer's new rows are appended
        to its cache and attend over everything before them."""
        x = self.embed(tokens, start)
        for i, b in enumerate(self.blocks):
            h = b.ln1(x)
            x = x + torch.from_numpy(session.append(f"dec{i}", h.numpy()))
            x = x + b.mlp(b.ln2(x))
        return self.head(self.ln_f(x))


def write_served_layers(model, out_dir, heads):
    """All attention layers in one file (prefix layers.<i>.attn.), and the server config that serves them."""
    weights = os.path.join(out_dir, "decoder.safetensors")
    save_attention_layers(weights, {f"layers.{i}.attn.": b.attn for i, b in enumerate(model.blocks)})
    dim = model.tok.embedding_dim
    config = os.path.join(out_dir, "decoder.pbtxt")
    with open(config, "w") as f:
        for i in range(len(model.blocks)):
            f.write(f'layers {{ name: "dec{i}" embed_dim: {dim} num_heads: {heads} weights_path: "{weights}" '
                    f'weights_prefix: "layers.{i}.attn." }}\n')
    return config


def start_server(binary, config, log_path):
    log = open(log_path, "w")
    proc = subprocess.Popen([binary, "--config", config, "--grpc-address", "127.0.0.1:0", "--metrics-address",
                             "127.0.0.1:0", "--log-level", "info"], stdout=log, stderr=log)
    deadline = time.time() + 60
    while time.time() < deadline:
        m = re.search(r"ready: grpc_port=(\d+)", open(log_path).read())
        if m:
            return proc, f"127.0.0.1:{m.group(1)}"
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("attnserve did not start: " + open(log_path).read()[-2000:])


def generate(model, client, prompt, steps, layers):
    """Greedy generation on a session, checked at every step against the local model. Returns the worst
    logits error and whether every token agreed."""
    worst, same = 0.0, True
    tokens = prompt.clone()
    with client.session("remote-decoder", [f"dec{i}" for i in range(layers)]) as s:
        logits = model.forward_session(s, tokens, 0)  # prefill: the whole prompt in one append per layer
        for step in range(steps):
            local = model.forward_local(tokens)
            worst = max(worst, (logits - local[len(tokens) - len(logits):]).abs().max().item())
            nxt = int(logits[-1].argmax())
            same &= nxt == int(local[-1].argmax())
            tokens = torch.cat([tokens, torch.tensor([nxt])])
            logits = model.forward_session(s, tokens[-1:], len(tokens) - 1)  # decode: one token
            print(f"step {step}: token {nxt}, max |logits - local| so far {worst:.2e}", flush=True)
    return worst, same, tokens


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attnserve", help="path to the attnserve binary: start a server for the model")
    ap.add_argument("--target", default="127.0.0.1:50051", help="a server already serving --weights-out's config")
    ap.add_argument("--weights-out", help="where to write the weights and config (default: a temporary directory)")
    ap.add_argument("--token-file", help="bearer token for a server with --auth-token-file: the file's first line "
                                         "(default: $ATTNSERVE_TOKEN, if set)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=12, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=24, help="tokens to generate")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    model = Decoder(vocab=97, dim=args.dim, heads=args.heads, layers=args.layers, max_len=512).eval()
    out_dir = args.weights_out or tempfile.mkdtemp(prefix="remote_decoder_")
    config = write_served_layers(model, out_dir, args.heads)
    proc, target = None, args.target
    if args.attnserve:
        proc, target = start_server(args.attnserve, config, os.path.join(out_dir, "attnserve.log"))
    try:
        client = attnserve.Client(target, token_file=args.token_file)
        prompt = torch.randint(0, 97, (args.prompt,))
        with torch.no_grad():
            worst, same, tokens = generate(model, client, prompt, args.steps, args.layers)
        client.close()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(f"generated {tokens[args.prompt:].tolist()}")
    ok = worst <= 1e-4 and same
    print(f"{'OK' if ok else 'FAIL'}: max |logits - local| {worst:.2e} (bound 1e-4), tokens "
          f"{'identical' if same else 'differ'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
