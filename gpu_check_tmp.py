import copy, torch, torch.nn.functional as F, sys
sys.path.insert(0, ".")
from transformers import LlamaConfig, AutoModelForCausalLM
from easy_context.memory import *
cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
torch.manual_seed(0)
base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").float().cuda().train()
ids = torch.randint(0,128,(1,4096),device="cuda"); tgt = torch.randint(0,128,(1,4096),device="cuda")
def run(m):
    torch.cuda.reset_peak_memory_stats(); m0 = torch.cuda.memory_allocated()
    loss = F.cross_entropy(m(ids).logits.flatten(0,1), tgt.flatten()); loss.backward()
    return loss.item(), {n:p.grad.clone() for n,p in m.named_parameters()}, (torch.cuda.max_memory_allocated()-m0)/2**20
ref = run(copy.deepcopy(base))
for feats in ["ckpt", "offload", "preserve", "tiled", "all"]:
    m = copy.deepcopy(base)
    if feats=="ckpt": m.activation_checkpointing_enable()
    if feats in ("offload","all"): c=enable_offloaded_checkpointing(m)
    if feats in ("preserve","all"): enable_attention_preserving_checkpointing(m)
    if feats in ("tiled","all"): enable_tiled_mlp(m, tile_size=512)
    r = run(m)
    err = max(((r[1][n]-g).abs().max()/g.abs().max()).item() for n,g in ref[1].items())
    print(feats, "loss", r[0]-ref[0], "max rel grad err", err, "peak MiB", round(r[2]), "ref peak", round(ref[2]), getattr(m.model.layers[0]._gradient_checkpointing_func, "offloaded_bytes", None))
