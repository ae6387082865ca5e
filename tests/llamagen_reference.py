"""An independent, functional re-statement of LlamaGen's text-to-image forward pass.

Written from the paper and the reference's published architecture (not from our model code), in
LlamaGen's own state-dict key names, so that importing its checkpoints can be checked for parity.
RoPE is computed with complex numbers here (ours uses real pairs), and the condition prefix gets
the reference's zero rotation.
"""

import torch
import torch.nn.functional as F


def _rms(x, w, eps=1e-5):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w


def _freqs_2d_complex(grid, head_dim, base, n_prefix):
    quarter = head_dim // 4
    inv = base ** (-torch.arange(quarter, dtype=torch.float64) * 4 / head_dim)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat([ys.reshape(-1, 1) * inv, xs.reshape(-1, 1) * inv], dim=1)  # (g*g, hd/2)
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    return torch.cat([torch.zeros(n_prefix, head_dim // 2, dtype=torch.complex64), rot])


def _rotate(x, rot):  # x: (B, T, H, D)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(3).type_as(x)


def reference_t2i_logits(sd, n_head, grid, captions, emb_mask, codes, base=10000.0):
    """LlamaGen t2i teacher-forced logits for image tokens. captions: (B, 120, D), left-padded."""
    B, P, _ = captions.shape
    cond = F.linear(
        F.gelu(F.linear(captions, sd["cls_embedding.cap_proj.fc1.weight"]), approximate="tanh"),
        sd["cls_embedding.cap_proj.fc2.weight"],
    )
    h = torch.cat([cond, F.embedding(codes[:, :-1], sd["tok_embeddings.weight"])], dim=1)
    T = h.size(1)
    dim = h.size(-1)
    hd = dim // n_head
    rot = _freqs_2d_complex(grid, hd, base, P)[:T]
    mask = torch.tril(torch.ones(T, T))
    mask = mask.repeat(B, 1, 1)
    mask[:, :, :P] = mask[:, :, :P] * emb_mask[:, None, :].float()
    mask = torch.maximum(mask, torch.eye(T)[None]).bool()[:, None]
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    for i in range(n_layer):
        p = f"layers.{i}."
        x = _rms(h, sd[p + "attention_norm.weight"])
        q, k, v = F.linear(x, sd[p + "attention.wqkv.weight"]).split(dim, dim=-1)
        q = _rotate(q.view(B, T, n_head, hd), rot).transpose(1, 2)
        k = _rotate(k.view(B, T, n_head, hd), rot).transpose(1, 2)
        v = v.view(B, T, n_head, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + F.linear(a.transpose(1, 2).reshape(B, T, dim), sd[p + "attention.wo.weight"])
        x = _rms(h, sd[p + "ffn_norm.weight"])
        ff = F.silu(F.linear(x, sd[p + "feed_forward.w1.weight"])) * F.linear(
            x, sd[p + "feed_forward.w3.weight"]
        )
        h = h + F.linear(ff, sd[p + "feed_forward.w2.weight"])
    h = _rms(h, sd["norm.weight"])
    return F.linear(h, sd["output.weight"])[:, P - 1 :]
