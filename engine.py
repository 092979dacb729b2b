"""
engine.py: the rollout engine. GRPO's generation at the speed of reading the weights once per token.

model.sample decodes through the Hugging Face layer stack: a growing DynamicCache, a new attention
mask and over a thousand kernel launches per token, and a host sync per token. On a CPU that costs
what its arithmetic costs; on a GPU it is launch-bound (37.6 ms per token for the 3B at batch 18 on
an H100, where reading its bf16 weights takes ~2.5 ms). Here each token is one decode step with
fixed shapes, in plain torch over the checkpoint's own weights:

- prefill: the prompts go through the Hugging Face forward once (vision tower, M-RoPE positions,
  a DynamicCache), exactly as model.sample; their keys and values are then copied, G times per
  prompt, into a KV cache allocated once per rollout batch: (layers, N, kv heads, S, head dim).
- decode step, one token for all N rows, per Qwen2 / Qwen3 / Llama-style text decoder layer (Qwen2-VL,
  Qwen2.5-VL, Qwen3-VL, SmolVLM2, LLaVA, InternVL; supports() says which):
  RMSNorm; the q, k, v projections (biases where the model has them) as one fused GEMM; Qwen3's
  per-head q/k RMSNorm where it has them; rotary embedding at
  each row's own position next_pos + t (for text tokens the three M-RoPE sections share one
  position, so it is plain 1-D RoPE with the model's inv_freq: theta and section layout give the
  same cos/sin); the new k, v written at cache column L + t; grouped-query attention over the cache
  (each KV head's g query heads attend as g queries, so the cache is never repeated) under a mask
  of the row's valid columns (prompts are left-padded); o projection; SwiGLU MLP; residuals; the
  final norm and the lm_head (tied or not).
- sampling: the same counter-based Gumbel-max as model.sample (gumbel_noise(seed, t, token)), so
  the same seeds give the same tokens; greedy at temperature 0. Each token's log-prob at the
  sampling temperature comes out too (0 after a row's EOS).
- stops: the all-rows-ended check runs every `check_every` tokens, not every token (one host sync
  per 8 tokens); rows that ended emit padding, and the result is trimmed to the last row's EOS,
  so tokens and mask equal model.sample's.
- on CUDA the step (sampling, cache writes, the step counter included) is captured as a CUDA
  graph after one eager warm-up step and replayed per token: about a thousand kernels, one launch.
  If capture fails (an op that syncs, an unsupported kernel), it warns and decodes eagerly: the
  same tokens, only slower.

Under LoRA (lora.py) each adapted projection's weight is merged, W + B A * alpha / r, into this per-rollout
copy (the adapted layers' weights once more in memory while the rollout runs): a LoRA layer's .weight is its
base weight, and reading it would sample from the reference.

The decode step runs in the autocast dtype when autocast is on (fp32 weights under bf16 autocast:
the text weights are cast once per rollout batch, ~6 GB for the 3B), else in the weights' own dtype
(bf16 training: only q, k, v are copied, fused; float32 on CPU). In float32 it samples token for
token what model.sample samples (tests/test_engine.py); in bf16 the two differ by rounding. The
plain path, model.sample, stays: for comparison, and under FSDP (sharded weights).

    import engine
    out = engine.sample(vlm, batch, group_size=6, max_new_tokens=256, temperature=1.0, seeds=seeds)
    out["tokens"], out["mask"], out["logps"]          # (N, T) each, as model.sample (+ log-probs)

The cache and graph are rebuilt per call (stateless); to save the capture, keep them while N and
S stay fixed.

A model whose text layers the decode step does not cover (supports() names what it lacks: Qwen3.5's
linear attention, Gemma 3's (1 + w) norms, sliding windows and scaled embeddings) is sampled by
model.sample instead, with its log-probs from completion_logps: the same contract, said once per family
in one line, never a silent approximation.
"""

import time
import warnings

import torch
import torch.nn.functional as F

import lora
import model as M
from common import print0
from families import FAMILIES, text_model

# -----------------------------------------------------------------------------
# the decoder: the checkpoint's text weights and a static KV cache


def rms_norm(x, weight, eps):
    # Qwen2's RMSNorm (computed in fp32 inside; one kernel where torch has the fused one)
    return F.rms_norm(x, (x.size(-1),), weight, eps)


def rotate(x, cos, sin):
    # rotary embedding, the rotate-half layout of Qwen2 (x (N, H, D), cos/sin (N, 1, D))
    x1, x2 = x.chunk(2, -1)
    return x * cos + torch.cat((-x2, x1), -1) * sin


def supports(model):
    """None if the decode step below computes exactly what `model`'s text layers compute, else what it lacks.
    Checked from the modules themselves, so a family or setting it was never written for falls back."""
    text, cfg = text_model(model), model.config.get_text_config()
    kind = model.config.model_type
    if type(text.embed_tokens) is not torch.nn.Embedding:
        return "scaled embeddings"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or []) or \
            getattr(cfg, "use_sliding_window", False):
        return "sliding-window or linear-attention layers"
    if (cfg.rope_parameters or {}).get("rope_type", "default") not in ("default", "linear", "llama3"):
        return f"{cfg.rope_parameters['rope_type']} RoPE"
    if getattr(cfg, "final_logit_softcapping", None) or getattr(model.lm_head, "bias", None) is not None:
        return "a soft-capped or biased lm_head"
    for layer in text.layers:
        a = getattr(layer, "self_attn", None)
        parts = {n for n, _ in layer.named_children()}
        if a is None or parts != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}:
            return f"decoder layers with {sorted(parts)}"
        if {n for n, _ in a.named_children()} - {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"} or \
                {n for n, _ in layer.mlp.named_children()} - {"gate_proj", "up_proj", "down_proj", "act_fn"}:
            return "attention or MLP parts other than q/k/v/o (q/k norm) and SwiGLU"
        if abs(a.scaling - a.head_dim ** -0.5) > 1e-12 or 2 * text.rotary_emb.inv_freq.numel() != a.head_dim:
            return "attention scaled other than 1/sqrt(head_dim), or partial rotary"
        if "Gemma" in type(layer.input_layernorm).__name__:
            return "(1 + w) RMSNorm"
    if not FAMILIES.get(kind, {}).get("engine"):  # tests/test_families.py checks each family it claims
        return f"a test for {kind}"
    return None


class Decoder:
    """One decode step over N rows with a KV cache of S columns, from `model`'s own weights in `dtype`."""

    def __init__(self, model, N, S, dtype):
        text = text_model(model)
        cast = {}  # a tied lm_head is the embedding matrix: one copy at most

        def get(p):
            if id(p) not in cast:
                cast[id(p)] = p.detach().to(dtype)  # the parameter itself when it is already `dtype`
            return cast[id(p)]

        def proj(linear):  # under LoRA a layer's .weight is its BASE weight: the adapters merged in (a new tensor)
            w = lora.merged_weight(linear)
            return get(w) if w is linear.weight else w.to(dtype)

        def weights(layer):
            a, m = layer.self_attn, layer.mlp
            # q, k and v as one projection: one GEMM, then one rotary pass over the q and k heads
            # (a copy per rollout batch: 0.38 GB for the 3B, as the weights change every step)
            qkv = torch.cat([lora.merged_weight(a.q_proj), lora.merged_weight(a.k_proj),
                             lora.merged_weight(a.v_proj)]).to(dtype)
            biased = a.q_proj.bias is not None  # Qwen2's q, k, v have biases; Qwen3's and Llama's none
            qkv_bias = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).to(dtype) if biased else None
            qk_norm = hasattr(a, "q_norm")  # Qwen3: RMSNorm over each q and k head, before the rotary embedding
            return dict(qkv=qkv, qkv_bias=qkv_bias, o=proj(a.o_proj), gate=proj(m.gate_proj),
                        up=proj(m.up_proj), down=proj(m.down_proj),
                        norm1=get(layer.input_layernorm.weight), norm2=get(layer.post_attention_layernorm.weight),
                        q_norm=get(a.q_norm.weight) if qk_norm else None,
                        k_norm=get(a.k_norm.weight) if qk_norm else None)

        self.layers = [weights(layer) for layer in text.layers]
        self.embed, self.norm, self.head = get(text.embed_tokens.weight), get(text.norm.weight), get(model.lm_head.weight)
        attn = text.layers[0].self_attn
        self.kv_heads, self.head_dim = attn.config.num_key_value_heads, attn.head_dim
        self.eps, self.act = text.norm.variance_epsilon, text.layers[0].mlp.act_fn
        self.qk_eps = attn.q_norm.variance_epsilon if hasattr(attn, "q_norm") else None
        self.inv_freq = text.rotary_emb.inv_freq.float()                    # (D/2,), from rope_theta
        self.rope_scale = text.rotary_emb.attention_scaling                  # 1.0 for the default RoPE
        shape = (len(self.layers), N, self.kv_heads, S, self.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.embed.device)  # allocated once per rollout batch
        self.v = torch.zeros_like(self.k)
        self.cols = torch.arange(S, device=self.embed.device)                # (S,)

    def load_prompts(self, cache, attention_mask, group_size):
        """Copy the prefill's keys/values (P, kv heads, L, D) per layer into the cache, G times per prompt."""
        L = attention_mask.size(1)
        for i, layer in enumerate(cache.layers):
            self.k[i, :, :, :L] = layer.keys.repeat_interleave(group_size, 0)
            self.v[i, :, :, :L] = layer.values.repeat_interleave(group_size, 0)
        self.L = L
        pad = torch.zeros(attention_mask.size(0), self.cols.numel() - L, dtype=torch.bool, device=self.cols.device)
        self.prompt_mask = torch.cat([attention_mask.bool(), pad], 1).repeat_interleave(group_size, 0)  # (N, S)

    def forward(self, tok, t, pos):
        """Token `tok` (N,) at cache column L + t (t: (1,) on the device), rope position pos (N,) -> logits (N, V) fp32."""
        N, D, col = tok.size(0), self.head_dim, self.L + t
        x = F.embedding(tok, self.embed)                                     # (N, H)
        ang = pos.float()[:, None] * self.inv_freq                           # (N, D/2)
        ang = torch.cat((ang, ang), -1)[:, None]                             # (N, 1, D)
        cos, sin = (ang.cos() * self.rope_scale).to(x.dtype), (ang.sin() * self.rope_scale).to(x.dtype)
        # the columns a row attends to: its prompt (left padding excluded) and the tokens decoded so far
        visible = self.prompt_mask | ((self.cols >= self.L) & (self.cols <= col))           # (N, S)
        bias = torch.zeros(visible.shape, dtype=x.dtype, device=x.device).masked_fill(~visible, float("-inf"))
        bias = bias[:, None, None]                                           # (N, 1, 1, S)
        Hkv = self.kv_heads
        for w, k_cache, v_cache in zip(self.layers, self.k, self.v):
            h = rms_norm(x, w["norm1"], self.eps)
            qkv = F.linear(h, w["qkv"], w["qkv_bias"]).view(N, -1, D)         # (N, Hq + 2 Hkv, D)
            qk = qkv[:, :-Hkv]                                               # (N, Hq + Hkv, D)
            if w["q_norm"] is not None:
                qk = torch.cat([rms_norm(qk[:, :-Hkv], w["q_norm"], self.qk_eps),
                                rms_norm(qk[:, -Hkv:], w["k_norm"], self.qk_eps)], 1)
            qk, v = rotate(qk, cos, sin), qkv[:, -Hkv:]                       # (N, Hq + Hkv, D), (N, Hkv, D)
            q, k = qk[:, :-Hkv], qk[:, -Hkv:]
            k_cache.index_copy_(2, col, k[:, :, None])                       # (N, Hkv, S, D)
            v_cache.index_copy_(2, col, v[:, :, None])
            # grouped-query attention: the g query heads of a KV head are g queries over its cache
            o = F.scaled_dot_product_attention(q.reshape(N, Hkv, -1, D), k_cache, v_cache, attn_mask=bias)
            x = x + F.linear(o.reshape(N, -1), w["o"])                       # o: (N, Hkv, g, D)
            h = rms_norm(x, w["norm2"], self.eps)
            x = x + F.linear(self.act(F.linear(h, w["gate"])) * F.linear(h, w["up"]), w["down"])  # SwiGLU
        return F.linear(rms_norm(x, self.norm, self.eps), self.head).float()


# -----------------------------------------------------------------------------
# sampling: prefill on the Hugging Face forward, then the decode step per token


def prefill(vlm, batch):
    """The prompts through the Hugging Face forward, as model.sample: (logits (P, V), cache, next positions (P,))."""
    return M.prefill(vlm, batch)


_FELL_BACK = set()  # the families already told, once each


def fallback(vlm, batch, group_size, max_new_tokens, temperature, seeds, ignore_eos, reason):
    """model.sample for a model the decode step does not cover, with the sampled tokens' log-probs."""
    kind = vlm.model.config.model_type
    if kind not in _FELL_BACK:
        _FELL_BACK.add(kind)
        print0(f"engine: {kind} decodes on model.sample (engine.py's decode step lacks {reason}): "
               f"the same tokens, without the static cache's speed")
    out = M.sample(vlm, batch, group_size, max_new_tokens, temperature, seeds, ignore_eos=ignore_eos)
    logps = M.completion_logps(vlm, batch, out["tokens"], group_size, temperature if temperature > 0 else 1.0)
    return {**out, "logps": logps * out["mask"]}


def capture(step):
    """(run, tokens decoded): a CUDA graph of `step` to replay, after one eager warm-up step that decodes
    a real token; or `step` itself, with a warning, if anything fails (no CUDA, an op that syncs)."""
    decoded = 0
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capturing stream (cuBLAS handles, allocator)
            step()
        decoded = 1
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records, runs nothing: the state is as the warm-up left it
            step()
        return graph.replay, decoded
    except Exception as e:  # noqa: BLE001 - whatever failed, eager decoding gives the same tokens
        warnings.warn(f"engine: CUDA graph capture failed ({type(e).__name__}: {e}); decoding eagerly (slower)")
        return step, decoded


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def sample(vlm, batch, group_size=1, max_new_tokens=128, temperature=1.0, seeds=None, ignore_eos=False,
           check_every=8, graph=None, stats=None):
    """model.sample's contract (G completions per prompt, prompt-major; the same seeds, the same tokens)
    on a static KV cache. Returns {"tokens", "mask", "logps"}, each (N, T): logps are the sampled
    tokens' log-probs at the sampling temperature (temperature 0: at 1), 0 after a row's EOS.

    graph: capture the decode step as a CUDA graph (default: on CUDA); on CPU it falls back with a
    warning. stats: a dict to fill with prefill/capture/decode seconds and the steps decoded.
    """
    model, G, eos, pad = vlm.model, group_size, vlm.eos_id, vlm.pad_id
    device, P = batch["input_ids"].device, batch["input_ids"].size(0)
    N, L = P * G, batch["input_ids"].size(1)
    if temperature > 0 and seeds is None:
        raise ValueError("sampling needs one seed per completion (see model.rollout_seeds)")
    reason = supports(model)
    if reason:
        return fallback(vlm, batch, G, max_new_tokens, temperature, seeds, ignore_eos, reason)
    graph = device.type == "cuda" if graph is None else graph
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else next(model.parameters()).dtype
    t0 = _sync(device)

    # prefill P prompts on the Hugging Face forward, then the cache holds each G times
    logits, cache, next_pos = prefill(vlm, batch)                            # (P, V), ..., (P,)
    S = -(-(L + max_new_tokens) // 64) * 64  # columns, rounded up: aligned rows for the attention kernels
    dec = Decoder(model, N, S, dtype)
    dec.load_prompts(cache, batch["attention_mask"], G)
    del cache
    logits = logits.repeat_interleave(G, 0).contiguous()                     # (N, V), updated in place
    next_pos = next_pos.repeat_interleave(G, 0)                              # (N,)
    seeds = seeds.to(device) if seeds is not None else None
    tokens = torch.full((N, max_new_tokens), pad, dtype=torch.long, device=device)
    logps = torch.zeros((N, max_new_tokens), device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)                      # the step, on the device
    temp = temperature if temperature > 0 else 1.0  # the temperature of the returned log-probs

    def step():  # one token for every row: reads and writes only the tensors above (a graph replays it)
        lse = torch.logsumexp(logits / temp, -1)                             # (N,)
        if ignore_eos:  # benchmarks force max_new_tokens (like generate's min_new_tokens)
            logits[:, eos] = float("-inf")
        if vlm.generic:  # as model.sample: never an image placeholder in a completion
            logits[:, vlm.image_token_id] = float("-inf")
        if temperature > 0:  # Gumbel-max: argmax(logits / T + g) ~ softmax(logits / T)
            nxt = (logits / temperature + M.gumbel_noise(seeds, t, logits.size(-1), device)).argmax(-1)
        else:
            nxt = logits.argmax(-1)
        lp = logits.gather(1, nxt[:, None]).squeeze(1) / temp - lse
        nxt = torch.where(done, pad, nxt)                                    # (N,)
        tokens.index_copy_(1, t, nxt[:, None])
        logps.index_copy_(1, t, torch.where(done, 0.0, lp)[:, None])
        done.logical_or_(nxt == eos)
        logits.copy_(dec.forward(nxt, t, next_pos + t))
        t.add_(1)

    with torch.autocast(device.type, enabled=False):  # the weights are already in `dtype`
        t1 = _sync(device)
        run, start = capture(step) if graph and max_new_tokens else (step, 0)
        t2 = _sync(device)
        n = start
        for n in range(start + 1, max_new_tokens + 1):
            run()
            if not ignore_eos and n % check_every == 0 and bool(done.all()):  # the only host sync
                break
        t3 = _sync(device)
    mask = M.completion_mask(tokens, eos)
    T = int(mask.sum(1).max())  # the last row's EOS (or max_new_tokens): where model.sample stops
    if stats is not None:
        stats.update(prefill_s=t1 - t0, capture_s=t2 - t1 if graph else 0.0, decode_s=t3 - t2, steps=n - start,
                     graph=run is not step, rows=N)
    return {"tokens": tokens[:, :T], "mask": mask[:, :T], "logps": logps[:, :T]}
