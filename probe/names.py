"""One naming scheme for captured tensors and weight families.

Every name here is used verbatim in code, protos, metrics, artifacts and docs.

Captured per decision position (the position whose next token is being chosen):
    resid      [L+1, d_model]  h_0..h_L: residual stream at every block boundary
                               (h_0 = embeddings, h_l = output of block l)
    resid_mid  [L, d_model]    m_1..m_L: residual stream inside block l after its
                               attention sublayer was added

Weight families per layer (METHOD.md section 3):
    qkv        q/k/v projections stacked (Llama qkv_proj, GPT-2 c_attn); reads
               x = input_norm(h_{l-1})
    attn_out   attention output projection (o_proj / attn.c_proj); writes
               y = m_l - h_{l-1} (minus its bias)
    mlp_in     MLP input projection (gate and up stacked / c_fc); reads
               x = post_attention_norm(m_l)
"""

RESID = "resid"
RESID_MID = "resid_mid"

FAMILIES: tuple[str, str, str] = ("qkv", "attn_out", "mlp_in")
FAMILY_INDEX = {name: i for i, name in enumerate(FAMILIES)}

DEFAULT_K = 32
